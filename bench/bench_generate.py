"""Benchmark the policy's rollout path and its LoRA update (issue 4), on CPU by default.

(a) Generation: tokens per second of one completion at a time versus the batched rollout path
    (Policy.generate with gen_batch_size 16), on the same prompts, greedy, 128 new tokens; prints the
    ratio (target: batched >= 5x one at a time). Only real tokens count, not padding.
(b) The update: time and peak resident memory (ru_maxrss) of one LoRA update - log-probs, backward,
    optimizer step - on 8 completions of 256 tokens, with gradient checkpointing on and off, with LoRA
    on all layers and on the top layers only. Peak RSS never goes down within a process, so every
    configuration runs in a fresh subprocess.

    python bench/bench_generate.py            # the full run (about 10 minutes on 2 cores)
    python bench/bench_generate.py --quick    # a smoke test in about a minute
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

# Idle OpenMP threads sleep instead of spinning: on a CPU shared with other work, spinning threads
# made generation 5-10x slower in our runs. Must be set before torch starts its thread pool.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from policy import load_policy, length_sorted_batches  # noqa: E402

TASKS = [
    "Write a Python class for a bank account with deposit, withdraw and a transaction history.",
    "Implement merge sort in Python and explain each step in comments.",
    "Write a Python function that parses a CSV line with quoted fields, with docstrings and examples.",
    "Implement a least-recently-used cache in Python without functools.",
    "Write a Python function that checks whether a Sudoku board is valid, and explain it.",
    "Implement a binary search tree with insert, delete and in-order traversal in Python.",
    "Write a Python tokenizer for arithmetic expressions and an evaluator for them.",
    "Implement Dijkstra's shortest path algorithm in Python with a priority queue.",
    "Write a Python function that converts Roman numerals to integers and back, with tests.",
    "Implement a simple text-based tic-tac-toe game in Python.",
    "Write a Python function that finds all anagram groups in a list of words, and explain it.",
    "Implement run-length encoding and decoding in Python with unit tests.",
    "Write a Python function that flattens arbitrarily nested lists, iteratively and recursively.",
    "Implement a trie in Python with insert, search and prefix listing.",
    "Write a Python function that computes the longest common subsequence of two strings.",
    "Implement a matrix class in Python with addition, multiplication and transpose.",
]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux reports KiB


def bench_generation(args) -> None:
    policy = load_policy(args.model, device="cpu")
    prompts = [policy.format_chat(TASKS[i % len(TASKS)]) for i in range(args.prompts)]
    policy.generate(prompts[:1], max_new_tokens=4, greedy=True)  # warm-up
    print(f"generation: {len(prompts)} prompts, {args.new_tokens} new tokens, greedy", flush=True)

    rates = {}
    for label, batch_size in [("one at a time", 1), (f"batched at {args.batch}", args.batch)]:
        start = time.time()
        completions = policy.generate(prompts, max_new_tokens=args.new_tokens, greedy=True, gen_batch_size=batch_size)
        seconds = time.time() - start
        tokens = sum(len(c.ids) for c in completions)
        rates[label] = tokens / seconds
        print(f"  {label:>15}: {tokens} tokens in {seconds:6.1f} s = {rates[label]:6.1f} tok/s "
              f"({sum(c.truncated for c in completions)}/{len(completions)} hit the length limit)", flush=True)
    one, batched = rates.values()
    print(f"  ratio batched / one at a time: {batched / one:.1f}x (target >= 5x)", flush=True)


def update_worker(args) -> None:
    """One configuration of (b), in its own process; prints one JSON line."""
    start = time.time()
    policy = load_policy(args.model, device="cpu", lora_layers=args.lora_layers,
                         gradient_checkpointing=args.gradient_checkpointing == "on")
    load_seconds, rss_loaded = time.time() - start, peak_rss_gb()
    generator = torch.Generator().manual_seed(0)
    prompt = policy.encode(policy.format_chat(TASKS[0]))
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
    print(json.dumps({"load_s": load_seconds, "update_s": time.time() - start,
                      "rss_loaded_gb": rss_loaded, "rss_peak_gb": peak_rss_gb()}), flush=True)


def bench_update(args) -> None:
    env = dict(os.environ)
    if args.malloc_mmap_threshold:
        # glibc serves allocations below a (growing) threshold from its heap, which fragments and
        # keeps freed memory resident; a fixed threshold returns big blocks to the OS at once.
        env["MALLOC_MMAP_THRESHOLD_"] = str(args.malloc_mmap_threshold)
    print(f"update: {args.seqs} completions x {args.update_tokens} tokens (prompt ~40 tokens), "
          f"micro-batch {args.micro_batch}, LoRA r=16 on all projections, "
          f"MALLOC_MMAP_THRESHOLD_={env.get('MALLOC_MMAP_THRESHOLD_', 'glibc default')}; "
          "each row a fresh process", flush=True)
    for lora_layers in (0, args.top_layers):
        for checkpointing in ("on", "off"):
            command = [sys.executable, __file__, "--update-worker", "--model", args.model,
                       "--lora-layers", str(lora_layers), "--gradient-checkpointing", checkpointing,
                       "--seqs", str(args.seqs), "--update-tokens", str(args.update_tokens),
                       "--micro-batch", str(args.micro_batch)]
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            label = f"LoRA on {'all layers' if lora_layers == 0 else f'top {lora_layers} layers'}, checkpointing {checkpointing}"
            if result.returncode != 0:
                print(f"  {label}: failed\n{result.stderr[-2000:]}", flush=True)
                continue
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"  {label:>42}: update {r['update_s']:6.1f} s, peak RSS {r['rss_peak_gb']:5.1f} GB "
                  f"(after loading {r['rss_loaded_gb']:.1f} GB)", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", default="embedded", help="see azr_mini.py --help")
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke test")
    parser.add_argument("--prompts", type=int, default=16, help="prompts for (a)")
    parser.add_argument("--new-tokens", type=int, default=128, help="new tokens per completion in (a)")
    parser.add_argument("--batch", type=int, default=16, help="gen_batch_size of the batched run")
    parser.add_argument("--seqs", type=int, default=8, help="completions in the update (b)")
    parser.add_argument("--update-tokens", type=int, default=256, help="tokens per completion in (b)")
    parser.add_argument("--micro-batch", type=int, default=4, help="sequences per forward/backward in (b)")
    parser.add_argument("--top-layers", type=int, default=4, help="the 'top layers only' configuration")
    parser.add_argument("--malloc-mmap-threshold", type=int, default=0,
                        help="bytes; if set, passed to glibc for the update runs (1048576 cut peak RSS by a third here)")
    parser.add_argument("--skip-generation", action="store_true")
    parser.add_argument("--skip-update", action="store_true")
    # internal: one configuration of (b)
    parser.add_argument("--update-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--lora-layers", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--gradient-checkpointing", choices=("on", "off"), default="on", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.prompts, args.batch, args.new_tokens, args.seqs, args.update_tokens = 4, 4, 16, 2, 32
    if args.update_worker:
        return update_worker(args)
    print(f"bench_generate: model {args.model}, CPU, torch {torch.__version__}, {os.cpu_count()} cores, "
          f"{torch.get_num_threads()} threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}", flush=True)
    if not args.skip_generation:
        bench_generation(args)
    if not args.skip_update:
        bench_update(args)


if __name__ == "__main__":
    main()
