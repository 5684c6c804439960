"""Benchmark the update's log-probs: Policy.token_logprobs + backward over the micro-batches of one
cpu-preset step, the path before against the path now.

  - before: micro-batches of similar total length (length_sorted_batches), each row run from its
    first token, left-padded to the longest prompt of its micro-batch and right-padded to the
    longest completion (re-created here, as the update ran it until the shared prefix);
  - now: micro-batches of neighbouring prompts (prefix_sorted_batches), the prefix the rows share
    run once with its gradients, each row's own tokens on top, one row at a time (no padding).

The workload: a cpu-preset step trains batch_size (6) episodes of each task type and role, 36 in all
(those with a zero advantage are skipped; here none is). Their prompts are rebuilt from the requests
in notebooks/example_run/samples.jsonl (prompts.chat puts the system message and the worked example
in front, as the loop does) and their completions are the sampled ones. Each path runs in a fresh
process (peak RSS never goes down within one), and the paths take turns (--rounds), since the speed
of a shared machine drifts. Reported per path: seconds of log-probs + backward (wall, and CPU time,
which a busy machine disturbs less), peak RSS above the loaded model, the token positions the decoder
computed and the padding share (padded positions / computed positions). Positions are counted by a
hook on the decoder, so they are what ran.

    python bench/bench_update.py                      # the tiny random model: a quick check
    python bench/bench_update.py --model embedded     # the real figures (a few minutes on 2 cores)
"""

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import time
from pathlib import Path

# Idle OpenMP threads sleep instead of spinning (see bench_generate.py); set before torch starts.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import azr_mini  # noqa: E402
from models import load_policy  # noqa: E402
from policy import Policy, length_sorted_batches, prefix_sorted_batches  # noqa: E402
from prompts import PROPOSE, SOLVE, TASK_TYPES, THINK_PREFILL, chat  # noqa: E402

SAMPLES = ROOT / "notebooks" / "example_run" / "samples.jsonl"
PATHS = {"before": "before: length-sorted, padded", "now": "now: prefix-sorted, shared prefix"}


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def episodes(policy: Policy, per_kind: int) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, completion ids) of one step's trained episodes: per_kind of each task type and
    role, drawn (seed 0) from the example run's samples."""
    n_inputs = json.loads((SAMPLES.parent / "config.json").read_text())["n_inputs"]
    rows = [json.loads(line) for line in SAMPLES.read_text().splitlines()]
    rng = random.Random(0)
    prompts, completions = [], []
    for task_type in TASK_TYPES:
        for role in (PROPOSE, SOLVE):
            kind = [r for r in rows if (r["task_type"], r["role"]) == (task_type, role)]
            for r in rng.sample(kind, per_kind):
                messages = chat(task_type, role, r["prompt"], n_inputs).messages()
                prompts.append(policy.encode(policy.format_chat(messages, prefill=THINK_PREFILL)))
                # samples.jsonl writes the prefill in front of the sampled text
                completions.append(policy.encode(r["completion"].removeprefix(THINK_PREFILL)))
    return prompts, completions


def padded_logprobs(policy: Policy, prompts: list[list[int]], completions: list[list[int]]):
    """The path before: prompts left-padded, completions right-padded, so every completion starts in
    column P; one forward pass over the [b, P + T] block."""
    P, T = max(len(p) for p in prompts), max(len(c) for c in completions)
    ids = torch.full((len(prompts), P + T), policy.pad_id, dtype=torch.long)  # [b, P + T]
    attention_mask = torch.zeros_like(ids)  # [b, P + T]
    for row, (p, c) in enumerate(zip(prompts, completions)):
        ids[row, P - len(p): P + len(c)] = torch.tensor(p + c)
        attention_mask[row, P - len(p): P + len(c)] = 1
    ids, attention_mask = ids.to(policy.device), attention_mask.to(policy.device)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)  # [b, P + T] real tokens only
    hidden = policy.model.get_base_model().get_decoder()(
        input_ids=ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
    ).last_hidden_state[:, P - 1: -1]  # [b, T, H]: position P-1+t predicts completion token t
    logp = policy.completion_logprobs(hidden, ids[:, P:])  # [b, T]
    mask = attention_mask[:, P:].bool()  # [b, T]
    return logp.masked_fill(~mask, 0.0), mask


def worker(args) -> None:
    """One path, once, in this process; prints one JSON line."""
    policy = load_policy(args.model, lora_layers=azr_mini.Config().lora_layers, seed=0)
    prompts, completions = episodes(policy, args.per_kind)
    micro_batch = azr_mini.Config().micro_batch
    if args.path == "before":
        batches = length_sorted_batches([len(p) + len(c) for p, c in zip(prompts, completions)], micro_batch)
        policy.logprob_chunk = 64  # [b, 64] positions projected onto the vocabulary at once, as before
    else:
        batches = prefix_sorted_batches(prompts, micro_batch)
    advantages = torch.randn(len(prompts), generator=torch.Generator().manual_seed(0))  # [N] as TRR++ gives
    counts = {"computed": 0, "padded": 0}

    def count(module, args_, kwargs):  # every position the decoder runs, and the padded ones among them
        counts["computed"] += kwargs["input_ids"].numel()
        if kwargs.get("attention_mask") is not None:
            counts["padded"] += int((kwargs["attention_mask"] == 0).sum())

    policy.model.get_base_model().get_decoder().register_forward_pre_hook(count, with_kwargs=True)
    rss_loaded = peak_rss_gb()
    policy.model.train()  # as token_logprobs runs under autograd
    start, cpu_start = time.perf_counter(), time.process_time()
    for batch in batches:
        p, c = [prompts[i] for i in batch], [completions[i] for i in batch]
        logp, mask = padded_logprobs(policy, p, c) if args.path == "before" else policy.token_logprobs(p, c)
        loss = -(advantages[batch, None] * logp * mask).sum() / len(prompts)  # the REINFORCE loss's shape
        loss.backward()
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    real = sum(len(p) + len(c) for p, c in zip(prompts, completions))  # each row's tokens once
    print(json.dumps({"seconds": seconds, "cpu_seconds": cpu_seconds, "rss_loaded_gb": rss_loaded,
                      "rss_peak_gb": peak_rss_gb(), "real": real, "batches": len(batches), **counts}), flush=True)


def extra_rss(result: dict) -> float:
    return result["rss_peak_gb"] - result["rss_loaded_gb"]


def run_worker(args, path: str) -> dict | None:
    command = [sys.executable, __file__, "--model", args.model, "--per-kind", str(args.per_kind), "--worker",
               "--path", path]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        print(f"  {path} failed:\n{result.stderr[-3000:]}", flush=True)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="tiny", help="tiny for a quick check, embedded for the real figures")
    parser.add_argument("--rounds", type=int, default=2, help="times each path runs, taking turns")
    parser.add_argument("--per-kind", type=int, default=azr_mini.Config().batch_size,
                        help="episodes of each task type and role (the cpu preset's batch_size)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one path
    parser.add_argument("--path", choices=list(PATHS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    cfg = azr_mini.Config()
    print(f"bench_update: model {args.model}, torch {torch.__version__}, {os.cpu_count()} cores; a cpu-preset "
          f"step: {len(TASK_TYPES) * 2 * args.per_kind} episodes, micro-batch {cfg.micro_batch}, LoRA on the top "
          f"{cfg.lora_layers} layers, dtype auto, gradient checkpointing auto", flush=True)
    results: dict[str, list[dict]] = {path: [] for path in PATHS}
    for round_ in range(args.rounds):
        order = list(PATHS) if round_ % 2 == 0 else list(PATHS)[::-1]  # neither always goes first
        for path in order:
            r = run_worker(args, path)
            if r is None:
                continue
            results[path].append(r)
            print(f"  round {round_ + 1} {PATHS[path]:>34}: {r['seconds']:7.2f} s ({r['cpu_seconds']:.1f} s of CPU), "
                  f"peak RSS {extra_rss(r):5.2f} GB above the loaded model", flush=True)
    best = {path: min(rs, key=lambda r: r["seconds"]) for path, rs in results.items() if rs}
    for path, r in best.items():
        print(f"  {PATHS[path]:>34}: {r['seconds']:7.2f} s (best of {len(results[path])}; "
              f"{r['cpu_seconds']:.1f} s of CPU), {r['batches']} micro-batches, {r['computed']} positions "
              f"computed for {r['real']} tokens of prompt + completion ({r['computed'] / r['real']:.0%}), "
              f"padding {r['padded'] / r['computed']:.1%} of them", flush=True)
    if len(best) == 2:
        before, now = best["before"], best["now"]
        print(f"  now / before: time {now['seconds'] / before['seconds']:.2f} (CPU time "
              f"{now['cpu_seconds'] / before['cpu_seconds']:.2f}), positions computed "
              f"{now['computed'] / before['computed']:.2f}, peak RSS above the model "
              f"{extra_rss(now) / extra_rss(before):.2f}", flush=True)


if __name__ == "__main__":
    main()
