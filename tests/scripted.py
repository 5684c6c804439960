"""Shared by the loop tests: scripted answers, and the tiny model driven half by script (the prompts
of a real step, every other answer well formed) so that a run has rewards to learn from.

Run as a script it trains such a run, so that tests can kill a real trainer process:
    python tests/scripted.py --run-dir DIR --steps 3 [any azr_mini.py flag] [--resume DIR]
"""
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import azr_mini  # noqa: E402
from policy import Completion  # noqa: E402
from prompts import ABDUCTION, DEDUCTION, INDUCTION, PROPOSE, SOLVE  # noqa: E402


def answer(*blocks: tuple[str, str], think: str = "let me think") -> str:
    """A well-formed completion (after the "<think>" prefill)."""
    body = "\n".join(f"```{tag}\n{text}\n```" for tag, text in blocks)
    return f"{think}\n</think>\n<answer>\n{body}\n</answer>"


def kind_of(prompt: str) -> tuple[str, str]:
    """Which template a prompt came from (see prompts.py), read from its last user turn."""
    prompt = prompt.rsplit("<|im_start|>user", 1)[-1]
    markers = [("must predict the output", DEDUCTION, PROPOSE),
               ("must find an input that gives", ABDUCTION, PROPOSE),
               ("different inputs for it", INDUCTION, PROPOSE),
               ("What does this Python function return", DEDUCTION, SOLVE),
               ("Find an input for which", ABDUCTION, SOLVE),
               ("Write the Python function `f` that produced", INDUCTION, SOLVE)]
    for marker, task_type, role in markers:
        if marker in prompt:
            return task_type, role
    raise AssertionError(f"unknown prompt: {prompt[:80]}")


class HalfScripted:
    """The tiny model, but every other prompt gets a well-formed scripted answer (tokenized by the real
    tokenizer), so that rewards differ and the update has something to learn from. The choice depends
    only on the prompt, so a resumed run makes the same choices."""

    def __init__(self, policy):
        self.policy = policy

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def generate(self, prompts, **kwargs):
        real = self.policy.generate(prompts, **kwargs)
        out = []
        for k, (prompt, completion) in enumerate(zip(prompts, real)):
            if k % 2:
                out.append(completion)
                continue
            task_type, role = kind_of(prompt)
            n = len(prompt) % 50  # new programs for new prompts: a repeated one is a copy
            asked = re.findall(r"Write (\d+) different inputs", prompt)   # induction proposers: N inputs
            text = {
                (DEDUCTION, PROPOSE): answer(("python", f"def f(n):\n    return n * {n + 2}"), ("input", str(n))),
                (ABDUCTION, PROPOSE): answer(("python", f"def f(n):\n    return n + {n + 3}"), ("input", str(n))),
                (INDUCTION, PROPOSE): answer(*[("input", str(i)) for i in range(int(asked[-1]) if asked else 4)],
                                             ("message", "something")),
                (DEDUCTION, SOLVE): answer(("output", "4")),
                (ABDUCTION, SOLVE): answer(("input", "1")),
                (INDUCTION, SOLVE): answer(("python", "def f(a):\n    return a")),
            }[(task_type, role)]
            ids = self.policy.encode(text)
            out.append(Completion(completion.prompt_ids, ids, text, truncated=False))
        return out


TINY_FLAGS = ["--model", "tiny", "--max-new-tokens", "16", "--batch-size", "2", "--n-inputs", "4",
              "--learnability-rollouts", "2", "--seed-buffer-size", "2", "--seed-rounds", "3", "--lr", "1e-2",
              "--exec-timeout-s", "2"]


def run_tiny(run_dir: Path, *extra: str) -> Path:
    cfg = azr_mini.parse_args(TINY_FLAGS + ["--run-dir", str(run_dir), *extra])
    return azr_mini.train(cfg, HalfScripted(azr_mini.build_policy(cfg)))


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without_timings(m: dict) -> dict:
    return {k: v for k, v in m.items() if not k.startswith(("time/", "memory/"))}


def samples(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]


if __name__ == "__main__":
    import torch

    torch.set_num_threads(1)  # as in the tests, so that a subprocess computes the same numbers
    argv = sys.argv[1:]
    cfg = azr_mini.parse_args(argv if "--resume" in argv else TINY_FLAGS + argv)
    azr_mini.train(cfg, HalfScripted(azr_mini.build_policy(cfg)))
