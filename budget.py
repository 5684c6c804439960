"""What a run needs, said before it starts: memory and time.

Not in the paper (its runs had 80 GB GPUs to spare); here a run must fit a laptop or one consumer GPU,
and a student should learn that before a long run dies of it.

Memory. `python azr_mini.py --estimate` prints the predicted peak memory of a training step, part by
part, from the model's shape alone (its config.json; for the GPU presets' hub models, the table
below, since the hub may be out of reach), and exits: nothing is loaded. A normal run makes the same
prediction first and refuses to start, in one line, when it will not fit in what the device reports
free (CUDA: torch.cuda.mem_get_info; CPU: MemAvailable in /proc/meminfo; elsewhere no check). A step
has two phases that never overlap: sampling (the key/value cache of a generation batch, the sampling
buffers) and the update (the activations of a micro-batch, the log-prob chunk). The peak is what
stays all along (runtime, weights, LoRA with its gradients and AdamW state) plus the larger phase.

Time. The start-up line (`startup_line`) names the dtype and why, the threads, and a rough time for
the run: a short timed generate on the run's first prompts gives tokens/s, times the tokens the run
will generate at the lengths the example run saw.

How far to trust it: the prediction assumes the worst case of a step (every response max_new_tokens
long, no prompt prefix shared in the update), so a real step usually stays below it.
`python budget.py [azr_mini.py flags]` loads the model, runs one generate and one update micro-batch
at the flags' sizes and prints measured peak resident memory against predicted, per phase. On a CPU:
random models of hidden 64-512 in float32, checkpointing on and off, and the tiny and embedded
models in float32 and bf16 came within -13% and +23% (the README has each figure). Stated error on
a CPU: 25%. Loading is left out (in bf16 it briefly holds the float32 file's pages too). On a GPU
nothing here has been measured yet. GB here is 2^30 bytes, as GPU memory is counted.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from models import (EMBEDDED, TINY, describe_dtype, embedded_model_dir, load_tokenizer, resolve_device,
                    resolve_dtype, tiny_config)
from policy import Policy
from prompts import SEED_TRIPLET, THINK_PREFILL, propose_deduction

GB = 2**30


# --------------------------------------------------------------------------------------------------
# The model's shape


@dataclass(frozen=True)
class Shape:
    """What memory depends on, from a Qwen2/Llama-style config.json."""
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool  # lm_head shares the embedding matrix

    @classmethod
    def from_config(cls, config: dict) -> Shape:
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                   config["num_attention_heads"], config.get("num_key_value_heads", config["num_attention_heads"]),
                   config["vocab_size"], config.get("tie_word_embeddings", False))

    def describe(self) -> str:
        return (f"{self.layers} layers, hidden {self.hidden}, MLP {self.intermediate}, {self.heads} heads "
                f"({self.kv_heads} for keys/values), vocabulary {self.vocab}, "
                f"{'tied' if self.tied else 'separate'} input and output embeddings")


# The GPU presets' models (their config.json on the hub), and the embedded model before its first
# conversion (the GGUF conversion unties its embeddings: a separate lm_head).
KNOWN_SHAPES = {
    "Qwen/Qwen2.5-Coder-0.5B-Instruct": Shape(24, 896, 4864, 14, 2, 151936, tied=True),
    "Qwen/Qwen2.5-Coder-1.5B-Instruct": Shape(28, 1536, 8960, 12, 2, 151936, tied=True),
    "Qwen/Qwen2.5-Coder-3B-Instruct": Shape(36, 2048, 11008, 16, 2, 151936, tied=True),
    EMBEDDED: Shape(24, 896, 4864, 14, 2, 151936, tied=False),
}


def model_shape(model: str) -> Shape | None:
    """The shape of --model without loading it: a folder's config.json (the converted embedded model
    included), the table above, or the hub's local cache. None when none of them knows it."""
    if model == TINY:
        return Shape.from_config(tiny_config(load_tokenizer(TINY)).to_dict())
    folder = embedded_model_dir() if model == EMBEDDED else Path(model).expanduser()
    if (folder / "config.json").is_file():
        return Shape.from_config(json.loads((folder / "config.json").read_text()))
    if model in KNOWN_SHAPES:
        return KNOWN_SHAPES[model]
    if model.endswith(".gguf") or folder.is_dir():
        return None
    try:
        from transformers import AutoConfig
        return Shape.from_config(AutoConfig.from_pretrained(model, local_files_only=True).to_dict())
    except Exception:  # not in the hub cache, or not a model name at all
        return None


# --------------------------------------------------------------------------------------------------
# The prediction

# Prompt length (assumed): every prompt carries a worked example. Measured with the embedded
# tokenizer: solvers 400-560 tokens, deduction/abduction proposers 600 + about 45 per reference
# (K), induction proposers 710-830. Buffer programs the model wrote run longer than the seed's.
PROMPT_TOKENS = 600
PROMPT_TOKENS_PER_REFERENCE = 50

# nf4 with double quantization (models.load_policy): 4 bits a weight, an 8-bit scale per block of
# 64 weights, and a float32 scale per 256 blocks.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)

# What the process holds before any weight: the interpreter, torch, transformers, peft, the
# tokenizer. CPU: 0.57-0.61 GB measured (reference CPU). CUDA: the context, cuBLAS workspace and the
# allocator's slack, a guess (not measured).
RUNTIME = {"cpu": 0.6 * GB, "cuda": 0.6 * GB}

# Bytes per element of the buffers that sample a token from [rows, V] logits (policy.sample_next):
# a float32 copy, the softmax, the entropy terms, and the float64 cumulative sum.
SAMPLING_BYTES = 4 + 4 + 4 + 8

# The update allocates and frees many mid-sized tensors (one row through one layer at a time), and
# the allocator keeps much of what is freed: on a CPU, glibc's peak resident memory was 1.1-1.8 times
# the update's live tensors (random models of hidden 64-512). CUDA's caching allocator: a guess.
ALLOCATOR_SLACK = {"cpu": 0.5, "cuda": 0.2}


@dataclass
class Part:
    name: str
    bytes: float
    phase: str  # "always", "generate" or "update"
    note: str = ""


def prompt_tokens(cfg) -> int:
    return PROMPT_TOKENS + PROMPT_TOKENS_PER_REFERENCE * cfg.n_references


def uses_checkpointing(cfg, device: torch.device) -> bool:
    return {"auto": device.type == "cpu", "on": True, "off": False}[cfg.gradient_checkpointing]


def layer_activations(shape: Shape, b: int) -> float:
    """Bytes autograd keeps per token for one transformer layer with LoRA, without checkpointing:
    the two RMSNorms their float32 input and normalised output (4 x H, float32), attention the
    query, the keys and values repeated to every head, its output and o_proj's input (5 x H), the
    MLP gate, up, activation and product (4 x I). LoRA adds r numbers per projection: nothing."""
    return 16 * shape.hidden + (5 * shape.hidden + 4 * shape.intermediate) * b


def predict(cfg, shape: Shape, device: torch.device, dtype: torch.dtype, prompt: int | None = None) -> list[Part]:
    """The parts of a step's peak memory for a run with Config `cfg`, in bytes. `prompt`: the prompt
    length to assume (default: prompt_tokens)."""
    prompt = prompt or prompt_tokens(cfg)
    # The 4-bit path computes in `dtype` but keeps in float32 all it does not quantize (peft's
    # prepare_model_for_kbit_training), the embeddings too; so the residual stream is float32, and
    # bitsandbytes returns each product in its input's dtype: activations, keys and values, logits.
    b = 4 if cfg.load_in_4bit else dtype.itemsize
    H, I, V, L = shape.hidden, shape.intermediate, shape.vocab, shape.layers
    kv = shape.kv_heads * (H // shape.heads)                 # width of the keys (and of the values)
    linear = 2 * H * H + 2 * H * kv + 3 * H * I              # per layer: q, o; k, v; gate, up, down
    small = H + 2 * kv + 2 * H                               # per layer: q/k/v biases, two norms
    embeddings = V * H * (1 if shape.tied else 2)
    parts = [Part("runtime", RUNTIME.get(device.type, RUNTIME["cpu"]), "always",
                  "interpreter, libraries, tokenizer" + (", CUDA context (guess)" if device.type == "cuda" else ""))]
    if cfg.load_in_4bit:
        parts.append(Part("weights", L * linear * NF4_BYTES + (embeddings + L * small + H) * 4, "always",
                          f"layers in 4-bit nf4 {L * linear * NF4_BYTES / GB:.2f} GB, embeddings, norms and "
                          f"biases in float32 {(embeddings + L * small + H) * 4 / GB:.2f} GB"))
    else:
        parts.append(Part("weights", (L * (linear + small) + embeddings + H) * dtype.itemsize, "always",
                          f"{(L * (linear + small) + embeddings + H) / 1e9:.2f}B parameters in {dtype}"))
    sizes = {"q_proj": (H, H), "k_proj": (H, kv), "v_proj": (H, kv), "o_proj": (H, H),
             "gate_proj": (H, I), "up_proj": (H, I), "down_proj": (I, H)}
    targets = cfg.lora_target_modules.split(",")
    adapted = L if cfg.lora_layers == 0 else min(cfg.lora_layers, L)
    lora = adapted * sum(cfg.lora_r * (n_in + n_out) for name, (n_in, n_out) in sizes.items() if name in targets)
    parts.append(Part("LoRA", lora * 4 * 4, "always",
                      f"{lora / 1e6:.1f}M parameters on {adapted} of {L} layers; weights, gradients and "
                      "AdamW's two moments, float32"))

    # Sampling: up to gen_batch_size rows decode together, each holding the keys and values of its
    # prompt and of what it wrote. Prompts join the running rows once a quarter of the batch is free
    # (policy.RunningBatch.add), merged into a new cache: for a moment the running rows (3/4 of the
    # batch at most) are held twice. The first batch holds its prompts twice (prefilled and merged).
    rows, new = cfg.gen_batch_size, cfg.max_new_tokens
    per_token = L * 2 * kv * b
    held = max(2 * prompt, 1.75 * (prompt + new))
    parts.append(Part("KV cache", rows * held * per_token, "generate",
                      f"{rows} rows x ({prompt} prompt + {new} new tokens) x {per_token / 1024:.0f} KB, "
                      f"x{held / (prompt + new):.2f} while prompts join"))
    parts.append(Part("logits, sampling", rows * V * (b + SAMPLING_BYTES), "generate",
                      f"{rows} rows x {V} vocabulary"))
    parts.append(Part("prefill", prompt * (4 * H + 3 * I) * b, "generate",
                      "one prompt through one layer (flash attention: no prompt x prompt scores)"))

    # Update: micro_batch rows, each prompt + completion, run one row at a time; backward stops at the
    # lowest adapted layer. With checkpointing a layer keeps only its input, and backward recomputes
    # one (row, layer) at a time; without, every adapted layer keeps all its activations.
    m = cfg.micro_batch
    tokens = m * (prompt + new)
    full = layer_activations(shape, b)
    with_checkpoints = tokens * adapted * H * b + 2 * (prompt + new) * full
    without = tokens * adapted * full
    on = uses_checkpointing(cfg, device)
    parts.append(Part("activations", with_checkpoints if on else without, "update",
                      f"{m} rows x ({prompt} + {new}) tokens, checkpointing {'on' if on else 'off'} "
                      f"(it {'off' if on else 'on'}: {(without if on else with_checkpoints) / GB:.2f} GB)"))
    parts.append(Part("final hidden states", tokens * H * (b + 8), "update", "all rows, last layer and norm"))
    # The vocabulary projection of Policy.logprob_chunk positions, recomputed in backward: the logits
    # (and a float32 copy where they are not float32), the two float32 gradients of the log-softmax.
    chunk = min(Policy.logprob_chunk, m * new)
    logits = b if b == 4 else b + 4
    parts.append(Part("log-prob chunk", chunk * V * (logits + 8), "update",
                      f"{chunk} positions x {V}: logits and the backward of the float32 log-softmax"))
    slack = ALLOCATOR_SLACK.get(device.type, ALLOCATOR_SLACK["cpu"])
    update = sum(part.bytes for part in parts if part.phase == "update")
    parts.append(Part("allocator slack", slack * update, "update",
                      f"{slack:.0%} of the above: freed memory the allocator keeps"
                      + (" (measured)" if device.type == "cpu" else " (guess)")))
    return parts


def phase_totals(parts: list[Part]) -> dict[str, float]:
    """Bytes held at the peak of each phase, what stays all along included."""
    always = sum(p.bytes for p in parts if p.phase == "always")
    return {phase: always + sum(p.bytes for p in parts if p.phase == phase) for phase in ("generate", "update")}


def peak(parts: list[Part]) -> float:
    return max(phase_totals(parts).values())


def estimate_device(cfg) -> torch.device:
    """--device, which --estimate takes as given: a GPU's needs can be predicted on a machine without one."""
    return resolve_device(cfg.device) if cfg.device == "auto" else torch.device(cfg.device)


def available_memory(device: torch.device) -> int | None:
    """Bytes free for this run as the device reports them, or None where it does not say."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] if torch.cuda.is_available() else None
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:  # not Linux
        return None
    found = re.search(r"MemAvailable:\s+(\d+) kB", meminfo)
    return int(found.group(1)) * 1024 if found else None


def memory_report(cfg) -> str:
    """What --estimate prints: the parts, the phases, the peak, and whether it fits."""
    device = estimate_device(cfg)
    dtype = resolve_dtype(cfg.dtype, device)
    shape = model_shape(cfg.model)
    if shape is None:
        raise ValueError(f"--estimate: the shape of --model {cfg.model} is unknown (no config.json found); pass "
                         "a local model folder, or run once so that the model is downloaded or converted")
    parts = predict(cfg, shape, device, dtype)
    totals = phase_totals(parts)
    lines = [f"azr-mini --estimate: peak memory of a training step, predicted (preset {cfg.preset})",
             f"  model   {cfg.model}: {shape.describe()}",
             f"  device  {describe_dtype(cfg.dtype, device)}" + (", base in 4-bit nf4" if cfg.load_in_4bit else ""),
             "  assumes every response max_new_tokens long and no prompt prefix shared in the update "
             f"(prompts of {prompt_tokens(cfg)} tokens)"]
    for phase, title in (("always", "held all along"), ("generate", "sampling"), ("update", "update")):
        lines.append(f"  {title}:")
        lines += [f"    {p.name:<20} {p.bytes / GB:6.2f} GB  {p.note}" for p in parts if p.phase == phase]
    lines.append(f"  peak of sampling {totals['generate'] / GB:.2f} GB, of the update {totals['update'] / GB:.2f} GB")
    free = available_memory(device)
    verdict = "" if free is None else (f"; {free / GB:.1f} GB available on {device.type}: "
                                       + ("fits" if peak(parts) <= free else "DOES NOT FIT"))
    lines.append(f"  total   {peak(parts) / GB:.2f} GB{verdict}")
    return "\n".join(lines)


def refuse_if_too_big(cfg) -> None:
    """Stop a run, in one line, before it loads anything, when its predicted peak does not fit."""
    device = resolve_device(cfg.device)
    shape = model_shape(cfg.model)
    free = available_memory(device)
    if shape is None or free is None:
        return
    need = peak(predict(cfg, shape, device, resolve_dtype(cfg.dtype, device)))
    if need > free:
        raise SystemExit(f"error: this run needs about {need / GB:.1f} GB at its peak but {device.type} has "
                         f"{free / GB:.1f} GB available; lower --gen-batch-size, --micro-batch or --max-new-tokens "
                         "(or turn --gradient-checkpointing on); --estimate shows the parts")


# --------------------------------------------------------------------------------------------------
# Time, and the start-up line

# Rough, from the example run (notebooks/example_run: 30 cpu-preset steps): responses averaged 70-110
# of 320 tokens, 6-50% of proposals were valid, and an update took 0.75-0.9 of its step's sampling.
EXPECTED_LENGTH = 1 / 3
EXPECTED_VALID = 1 / 3
UPDATE_PER_SAMPLING = 0.8
SPEED_ROWS, SPEED_TOKENS = 8, 8  # the timed generate: rows x new tokens


def tokens_per_second(policy: Policy, cfg) -> float:
    """A short timed generate of SPEED_TOKENS tokens on SPEED_ROWS copies of the run's first prompt
    (a seeding proposal), at the run's sampling settings. It draws from a forked RNG, so the run's
    random numbers are the same as without it."""
    rows = min(SPEED_ROWS, cfg.gen_batch_size)
    prompt = policy.format_chat(propose_deduction([SEED_TRIPLET]).messages(), prefill=THINK_PREFILL)
    cuda = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda):
        start = time.perf_counter()
        policy.generate([prompt] * rows, max_new_tokens=SPEED_TOKENS, temperature=cfg.temperature, top_p=cfg.top_p,
                        gen_batch_size=cfg.gen_batch_size)
        seconds = time.perf_counter() - start
    return rows * SPEED_TOKENS / seconds


def rough_run_time(cfg, steps: int, seeding: bool, tok_s: float) -> float:
    """Seconds for seeding (if still to do) and `steps` steps at tok_s tokens/s: the tokens to
    generate at the expected response length, and each update as a share of its step's sampling."""
    length = EXPECTED_LENGTH * cfg.max_new_tokens
    per_round = 3 * max(cfg.batch_size, cfg.gen_batch_size // 3)           # seed_buffers: one batch a round
    per_step = 3 * cfg.batch_size * (2 + EXPECTED_VALID * cfg.learnability_rollouts)  # proposals, solves, rollouts
    seed_s = (cfg.seed_rounds * per_round if seeding else 0) * length / tok_s
    return seed_s + steps * per_step * length / tok_s * (1 + UPDATE_PER_SAMPLING)


def startup_line(cfg, policy: Policy, steps: int, seeding: bool) -> str:
    """The dtype and why, the threads, and a rough time for what is left of the run."""
    where = describe_dtype(cfg.dtype, policy.device) + (", 4-bit nf4 base" if cfg.load_in_4bit else "")
    tok_s = tokens_per_second(policy, cfg)
    minutes = rough_run_time(cfg, steps, seeding, tok_s) / 60
    if minutes < 1:
        took = "under a minute"
    elif minutes < 120:
        took = f"about {minutes:.0f} min"
    else:
        took = f"about {minutes / 60:.1f} h"
    work = ("seeding + " if seeding else "") + f"{steps} step{'s' * (steps != 1)}"
    threads = torch.get_num_threads()
    return (f"azr-mini: {where}; {threads} thread{'s' * (threads != 1)}; {took} for {work} "
            f"(rough: measured {tok_s:.0f} tok/s on {min(SPEED_ROWS, cfg.gen_batch_size)} prompts)")


# --------------------------------------------------------------------------------------------------
# Measured against predicted: python budget.py [azr_mini.py flags]


def resident_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset_peak) of this process, from /proc."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+) kB", status).group(1)) * 1024


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: VmHWM starts again from VmRSS


def peak_bytes(device: torch.device) -> int:
    """Peak since reset_peak: resident memory (CPU) or what the CUDA allocator reserved (its own
    context not included)."""
    return torch.cuda.max_memory_reserved(device) if device.type == "cuda" else resident_bytes("VmHWM")


def measure(cfg) -> dict[str, float]:
    """Load the policy as a run does, then run one generate (gen_batch_size copies of a proposer
    prompt, max_new_tokens each, no stop string) and one update micro-batch (micro_batch rows of
    prompt + max_new_tokens, backward and an AdamW step): the peak bytes of each phase (the whole
    process: what it held before included), and the prompt length used."""
    import azr_mini  # here, not at the top: azr_mini imports this file
    device = resolve_device(cfg.device)
    policy = azr_mini.build_policy(cfg)
    loading_peak = peak_bytes(device)           # since the process started
    prompt_text = policy.format_chat(propose_deduction([SEED_TRIPLET] * cfg.n_references).messages(),
                                     prefill=THINK_PREFILL)
    reset_peak(device)
    completions = policy.generate([prompt_text] * cfg.gen_batch_size, max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, gen_batch_size=cfg.gen_batch_size)
    generate_peak = peak_bytes(device)
    # The update's rows: every completion padded to max_new_tokens, and every row run from its first
    # token (share_prefix=False): the worst case the prediction assumes.
    prompts = [c.prompt_ids for c in completions[:cfg.micro_batch]]
    filler = policy.encode(" x")[0]
    answers = [(c.ids + [filler] * cfg.max_new_tokens)[:cfg.max_new_tokens] for c in completions[:cfg.micro_batch]]
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=cfg.lr)
    reset_peak(device)
    logp, mask = policy.token_logprobs(prompts, answers, share_prefix=False)
    (-(logp * mask).sum()).backward()
    optimizer.step()
    update_peak = peak_bytes(device)
    return {"loading": loading_peak, "generate": generate_peak, "update": update_peak,
            "prompt": len(completions[0].prompt_ids)}


def main(argv: list[str] | None = None) -> None:
    import azr_mini
    cfg = azr_mini.parse_args(argv)
    device = resolve_device(cfg.device)
    measured = measure(cfg)
    parts = predict(cfg, model_shape(cfg.model), device, resolve_dtype(cfg.dtype, device), prompt=measured["prompt"])
    totals = phase_totals(parts)
    print(f"model {cfg.model}, {describe_dtype(cfg.dtype, device)}, prompt {measured['prompt']} tokens, "
          f"gen batch {cfg.gen_batch_size} x {cfg.max_new_tokens} new, micro-batch {cfg.micro_batch}")
    print(f"  loading   measured {measured['loading'] / GB:6.3f} GB")
    for phase in ("generate", "update"):
        error = totals[phase] / measured[phase] - 1
        print(f"  {phase:<9} measured {measured[phase] / GB:6.3f} GB  predicted {totals[phase] / GB:6.3f} GB  "
              f"({100 * error:+.0f}%)")


if __name__ == "__main__":
    main()
