"""Benchmark the rollout path and the LoRA update on a CPU (issue 11); every figure is measured here,
the paths side by side in one run, each configuration in a fresh process (peak RSS never goes down
within a process).

(a) Rollouts on a real workload: the prompts of one cpu-preset self-play step (proposers of the three
    task types from the seed triplet, and solvers on seed-derived tasks), or the prompts of step 1 of
    a run with --from-run. Sampled as the loop samples (T = 1, stop at "</answer>"). Reports *useful*
    tokens per second: completion tokens kept, divided by wall time, and peak memory, for
      - the path before issue 11: transformers' `generate` on the LoRA model, float32;
      - the new path: Policy.generate (shared prefix once, finished rows leave the batch), with
        --dtype auto (bf16 on CPUs with AVX512-BF16 or AMX);
      - a reference: plain transformers `generate` on the base model (float32, no LoRA).
    The paths take turns (--rounds), since this VM's speed drifts.
(b) The update: one LoRA update (log-probs, backward, optimizer step) on 8 completions of 256 tokens,
    micro-batch 4, gradient checkpointing on, float32 against bf16, LoRA on the top 4 layers (the
    cpu preset) and on all layers.
(c) Log-prob memory at the gpu-8gb preset's shapes (micro-batch 4, 1k-token responses): peak RSS of
    one forward + backward with the vocabulary projected in one piece (as before issue 11) and in
    chunks of 64 positions (now).
(d) Refills, on a seeding round's workload: 64 deduction proposer prompts, T = 1, up to 320 new
    tokens, stop at "</answer>", batches of 16 (the cpu preset's). Useful tokens per second of
    Policy.generate with refills (waiting prompts take the places of finished rows) and without
    (batches one after the other, each until its longest row ends), taking turns, and the decoding
    steps each took. The gain grows with the spread of response lengths: the random tiny model never
    stops early, so it shows none.

    python bench/bench_generate.py                 # everything (about 30 minutes on 2 cores)
    python bench/bench_generate.py --only a --rounds 1 --new-tokens 32   # a quick look at (a)
    python bench/bench_generate.py --only d --model tiny --rounds 1 --refill-new-tokens 32   # (d) runs
"""

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning threads
# made generation 5-10x slower in our runs. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import azr_mini  # noqa: E402
from models import load_policy  # noqa: E402
from policy import left_pad, length_sorted_batches  # noqa: E402
from prompts import (DEDUCTION, SEED_TRIPLET, SOLVER_TEMPLATES, STOP, THINK_PREFILL, Chat, InductionTask,  # noqa: E402
                     Triplet, chat)

# Before issue 11, Policy.generate was transformers' `generate` on the LoRA model in float32, prompts
# left-padded in length-sorted batches, stopping at "</answer>": the "before" path re-creates it.
PATHS = {"before: transformers generate, LoRA, float32": "before",
         "now: Policy.generate, --dtype auto": "auto",
         "reference: transformers generate, base model, float32": "plain"}
# (d): Policy.generate, --dtype auto, with and without refills.
REFILL_PATHS = {"refill: finished rows make room for waiting prompts": "auto",
                "no refill: batches one after the other": "no-refill"}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def step_prompts(args) -> list[Chat]:
    """The prompts of one cpu-preset step (or of step 1 of a run, whose samples.jsonl keeps each
    request; the system message and worked example are put back in front as the loop does)."""
    cfg = azr_mini.Config()
    if args.from_run:
        with open(os.path.join(args.from_run, "samples.jsonl")) as fh:
            rows = [json.loads(line) for line in fh]
        n_inputs = json.loads(Path(args.from_run, "config.json").read_text())["n_inputs"]
        return [chat(r["task_type"], r["role"], r["prompt"], n_inputs) for r in rows if r["step"] == 1]
    rng = __import__("random").Random(0)
    reverse = Triplet("def f(s):\n    return s[::-1]", "'abc'", "'cba'")
    buffers = {"deduction": [SEED_TRIPLET, reverse], "abduction": [SEED_TRIPLET, reverse], "induction": []}
    requests = azr_mini.proposer_requests(buffers, rng, cfg, "propose")
    induction = InductionTask(SEED_TRIPLET.program, "returns its argument unchanged",
                              (("'Hello world'", "'Hello world'"), ("3", "3"), ("[1, 2]", "[1, 2]")),
                              (("'a'", "'a'"), ("0", "0"), ("(1,)", "(1,)")))
    tasks = {"deduction": [SEED_TRIPLET, reverse], "abduction": [SEED_TRIPLET, reverse], "induction": [induction]}
    prompts = [r.prompt for r in requests]
    # Learnability rollouts and the solve batch: solver prompts, as many as a step has.
    n_solver = 3 * cfg.batch_size * (1 + cfg.learnability_rollouts)
    kinds = list(SOLVER_TEMPLATES.items())
    for k in range(n_solver):
        task_type, template = kinds[k % 3]
        prompts.append(template(tasks[task_type][k // 3 % len(tasks[task_type])]))
    return prompts


def seed_prompts(args) -> list[Chat]:
    """A seeding round's prompts: deduction proposers, each shown references from a two-triplet buffer."""
    cfg = azr_mini.Config()
    rng = __import__("random").Random(0)
    reverse = Triplet("def f(s):\n    return s[::-1]", "'abc'", "'cba'")
    buffers = {"deduction": [SEED_TRIPLET, reverse], "abduction": [SEED_TRIPLET], "induction": []}
    requests = azr_mini.proposer_requests(buffers, rng, cfg, "seed", (DEDUCTION,), per_type=args.prompts)
    return [r.prompt for r in requests]


def generate_worker(args) -> None:
    """One path of (a) or (d), in its own process; prints one JSON line."""
    torch.manual_seed(0)
    dtype = "float32" if args.path in ("before", "plain") else "auto"
    policy = load_policy(args.model, device="cpu", dtype=dtype, lora_layers=4)
    chats = seed_prompts(args) if args.workload == "seed" else step_prompts(args)
    prompts = [policy.format_chat(c.messages(), prefill=THINK_PREFILL) for c in chats][: args.prompts]
    policy.generate(prompts[:1], max_new_tokens=2)  # warm-up
    steps = []  # Policy.generate's decoding steps: the forward passes with an attention mask (a prefill has none)

    def count_step(module, args_, kwargs):
        if kwargs.get("attention_mask") is not None:
            steps.append(kwargs["input_ids"].shape[0])

    start = time.time()
    if args.path in ("before", "plain"):  # transformers' generate, batched the same way
        with contextlib.ExitStack() as stack, torch.inference_mode():
            model = policy.model
            if args.path == "plain":  # the base model alone
                stack.enter_context(policy.model.disable_adapter())
                model = policy.model.get_base_model()
            ids = [policy.encode(p) for p in prompts]
            kept = 0
            for batch in length_sorted_batches([len(i) for i in ids], args.batch):
                input_ids, mask = left_pad([ids[i] for i in batch], policy.pad_id, policy.device)
                out = model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=args.new_tokens,
                                     do_sample=True, temperature=1.0, top_p=1.0, top_k=0, repetition_penalty=1.0,
                                     eos_token_id=policy.eos_ids, pad_token_id=policy.pad_id,
                                     stop_strings=[STOP], tokenizer=policy.tokenizer)
                kept += int((out[:, input_ids.shape[1]:] != policy.pad_id).sum())
    else:
        policy.model.get_base_model().get_decoder().register_forward_pre_hook(count_step, with_kwargs=True)
        completions = policy.generate(prompts, max_new_tokens=args.new_tokens, gen_batch_size=args.batch,
                                      stop_strings=[STOP], refill=args.path != "no-refill")
        kept = sum(len(c.ids) for c in completions)
    seconds = time.time() - start
    prompt_tokens = sum(len(policy.encode(p)) for p in prompts)
    print(json.dumps({"tokens": kept, "seconds": seconds, "prompts": len(prompts),
                      "prompt_tokens": prompt_tokens, "rss_peak_gb": peak_rss_gb(),
                      "steps": len(steps), "rows_per_step": sum(steps) / max(len(steps), 1)}), flush=True)


def update_worker(args) -> None:
    """One configuration of (b) or (c), in its own process; prints one JSON line."""
    policy = load_policy(args.model, device="cpu", dtype=args.dtype, lora_layers=args.lora_layers,
                         gradient_checkpointing=True)
    if args.logprob_chunk:
        policy.logprob_chunk = args.logprob_chunk
    rss_loaded = peak_rss_gb()
    generator = torch.Generator().manual_seed(0)
    prompt = policy.encode(policy.format_chat("Write a Python function that reverses a string."))
    # The content of the completions does not change the cost: random tokens of the right length.
    completions = torch.randint(0, 150_000, (args.seqs, args.update_tokens), generator=generator).tolist()
    advantages = torch.randn(args.seqs, generator=generator)  # [N] as TRR++ would give them
    optimizer = torch.optim.AdamW(policy.trainable_parameters(), lr=1e-5)
    start = time.time()
    n_tokens = args.seqs * args.update_tokens
    for batch in length_sorted_batches([len(c) for c in completions], args.micro_batch):
        logp, mask = policy.token_logprobs([prompt] * len(batch), [completions[i] for i in batch])  # [b, T]
        loss = -(advantages[batch, None] * logp * mask).sum() / n_tokens
        loss.backward()  # per micro-batch, so only one micro-batch's activations are alive
    torch.nn.utils.clip_grad_norm_(policy.trainable_parameters(), 1.0)
    optimizer.step()
    print(json.dumps({"update_s": time.time() - start, "rss_loaded_gb": rss_loaded,
                      "rss_peak_gb": peak_rss_gb()}), flush=True)


def run_worker(args, *extra: str) -> dict | None:
    command = [sys.executable, __file__, "--model", args.model, *extra]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  failed: {' '.join(extra)}\n{result.stderr[-2000:]}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def take_turns(args, paths: dict[str, list[str]]) -> dict[str, float]:
    """Run each path's generate worker (label: its flags) args.rounds times, the paths taking turns;
    print every run and the totals. Returns useful tokens per second by label."""
    totals = {label: [0, 0.0, 0.0] for label in paths}  # tokens, seconds, peak RSS
    for round_ in range(args.rounds):
        for label, flags in paths.items():
            r = run_worker(args, "--generate-worker", *flags)
            if r is None:
                continue
            steps = f", {r['steps']} steps of {r['rows_per_step']:.1f} rows" if r["steps"] else ""
            print(f"  round {round_ + 1} {label:>52}: {r['tokens']:5d} tokens in {r['seconds']:6.1f} s = "
                  f"{r['tokens'] / r['seconds']:5.1f} useful tok/s, peak RSS {r['rss_peak_gb']:.1f} GB "
                  f"(prompts: {r['prompt_tokens']} tokens{steps})", flush=True)
            t = totals[label]
            t[0], t[1], t[2] = t[0] + r["tokens"], t[1] + r["seconds"], max(t[2], r["rss_peak_gb"])
    rates = {label: t[0] / t[1] for label, t in totals.items() if t[1]}
    for label, rate in rates.items():
        print(f"  all rounds {label:>52}: {rate:5.1f} useful tok/s, peak RSS {totals[label][2]:.1f} GB", flush=True)
    return rates


def bench_generation(args) -> None:
    print(f"(a) rollouts: {len(step_prompts(args)[: args.prompts])} prompts of a cpu-preset step, up to "
          f"{args.new_tokens} new tokens, T = 1, stop at {STOP!r}, batches of {args.batch_before} (before, "
          f"reference) and {args.batch} (now), "
          f"{args.rounds} round(s), paths taking turns", flush=True)
    paths = {label: ["--path", path, "--new-tokens", str(args.new_tokens), "--prompts", str(args.prompts),
                     "--batch", str(args.batch if path == "auto" else args.batch_before),
                     *(["--from-run", args.from_run] if args.from_run else [])]
             for label, path in PATHS.items()}
    rates = take_turns(args, paths)
    before, now = list(PATHS)[:2]
    if before in rates and now in rates:
        print(f"  now / before: {rates[now] / rates[before]:.2f}x (target >= 3x)", flush=True)


def bench_refill(args) -> None:
    print(f"(d) refills: {args.prompts} deduction proposer prompts (a seeding round), up to "
          f"{args.refill_new_tokens} new tokens, T = 1, stop at {STOP!r}, batches of {args.refill_batch}, "
          f"{args.rounds} round(s), paths taking turns", flush=True)
    paths = {label: ["--path", path, "--workload", "seed", "--new-tokens", str(args.refill_new_tokens),
                     "--prompts", str(args.prompts), "--batch", str(args.refill_batch)]
             for label, path in REFILL_PATHS.items()}
    rates = take_turns(args, paths)
    refill, batches = REFILL_PATHS
    if refill in rates and batches in rates:
        print(f"  refill / no refill: {rates[refill] / rates[batches]:.2f}x", flush=True)


def bench_update(args) -> None:
    print(f"(b) update: {args.seqs} completions x {args.update_tokens} tokens, micro-batch "
          f"{args.micro_batch}, LoRA r=16, gradient checkpointing on", flush=True)
    for lora_layers in (4, 0):
        seconds = {}
        for dtype in ("float32", "bfloat16"):
            r = run_worker(args, "--update-worker", "--dtype", dtype, "--lora-layers", str(lora_layers),
                           "--seqs", str(args.seqs), "--update-tokens", str(args.update_tokens),
                           "--micro-batch", str(args.micro_batch))
            if r is None:
                continue
            seconds[dtype] = r["update_s"]
            where = "all layers" if lora_layers == 0 else f"top {lora_layers} layers"
            print(f"  LoRA on {where:>13}, {dtype:>8}: update {r['update_s']:6.1f} s, peak RSS "
                  f"{r['rss_peak_gb']:5.1f} GB (after loading {r['rss_loaded_gb']:.1f} GB)", flush=True)
        if len(seconds) == 2:
            print(f"  {'':>22} bf16 speed-up: {seconds['float32'] / seconds['bfloat16']:.2f}x", flush=True)


def bench_logprob_memory(args) -> None:
    tokens = 1024
    print(f"(c) log-prob memory at the gpu-8gb shapes: one micro-batch of 4 x {tokens} tokens, forward + "
          "backward, float32, LoRA on all layers", flush=True)
    peaks = {}
    for label, chunk in (("in one piece (before)", tokens + 1), ("in chunks of 64 (now)", 64)):
        r = run_worker(args, "--update-worker", "--dtype", "float32", "--lora-layers", "0", "--seqs", "4",
                       "--update-tokens", str(tokens), "--micro-batch", "4", "--logprob-chunk", str(chunk))
        if r is None:
            continue
        peaks[label] = r["rss_peak_gb"] - r["rss_loaded_gb"]
        print(f"  vocabulary projected {label:>22}: peak RSS {r['rss_peak_gb']:5.1f} GB, "
              f"{peaks[label]:.1f} GB above the loaded model, {r['update_s']:.0f} s", flush=True)
    if len(peaks) == 2:
        before, now = peaks.values()
        print(f"  memory above the model, now / before: {now / before:.2f} (target <= 0.5)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="embedded", help="see azr_mini.py --help")
    parser.add_argument("--only", choices=("a", "b", "c", "d"), help="run one part")
    parser.add_argument("--from-run", default="", help="replay the prompts of step 1 of this run")
    parser.add_argument("--prompts", type=int, default=64, help="at most this many prompts in (a)")
    parser.add_argument("--new-tokens", type=int, default=96, help="longest completion in (a)")
    parser.add_argument("--batch", type=int, default=azr_mini.Config().gen_batch_size,
                        help="gen_batch_size of the new path in (a): the cpu preset's")
    parser.add_argument("--batch-before", type=int, default=16,
                        help="gen_batch_size of the before and reference paths: the cpu preset's before issue 11")
    parser.add_argument("--rounds", type=int, default=2, help="times each path of (a) and (d) runs, taking turns")
    parser.add_argument("--refill-batch", type=int, default=16, help="gen_batch_size in (d): the cpu preset's")
    parser.add_argument("--refill-new-tokens", type=int, default=azr_mini.Config().max_new_tokens,
                        help="longest completion in (d)")
    parser.add_argument("--seqs", type=int, default=8, help="completions in the update (b)")
    parser.add_argument("--update-tokens", type=int, default=256, help="tokens per completion in (b)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward in (b)")
    # internal: one worker process
    parser.add_argument("--generate-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--update-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--path", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--workload", default="step", choices=("step", "seed"), help=argparse.SUPPRESS)
    parser.add_argument("--dtype", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--lora-layers", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--logprob-chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate_worker:
        return generate_worker(args)
    if args.update_worker:
        return update_worker(args)
    print(f"bench_generate: model {args.model}, CPU, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)
    for part, run in (("a", bench_generation), ("b", bench_update), ("c", bench_logprob_memory), ("d", bench_refill)):
        if args.only in (None, part):
            run(args)


if __name__ == "__main__":
    main()
