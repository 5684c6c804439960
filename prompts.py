"""What each role is asked, and how its answer is read.

In the paper (Zhao et al. 2025, Sec. 3.2-3.3 and Algorithm 1) one model plays two roles on three
task types, all built from a triplet (program p, input i, output o = p(i)):

    type        proposer writes                       solver sees          solver writes
    deduction   p and i  (given K reference triplets)  p, i                 o
    abduction   p and i  (given K reference triplets)  p, o                 an input i'
    induction   N inputs + a message m for a given p  m, half the (i, o)   a program p'

This file holds the six prompts (one function each, returning the USER MESSAGE only: applying the
model's chat template, or plain text for a base model, is policy.py's job), the records those tasks
are stored in, and the parsers that read a sampled response. `python prompts.py` prints all six
prompts for a sample task, so you can see exactly what the model sees.

Response format. Every response is

    <think> reasoning </think> <answer> fenced blocks </answer>

and the answer holds fenced blocks tagged python / input / output / message. As in the official
code, the assistant turn is pre-filled with THINK_PREFILL ("<think>") and generation stops at
STOP ("</answer>").

Parsing contract (how the prefill is handled): the parsers take the text the model produced and do
not care whether the prefill is glued in front. The opening "<think>" is optional; what is required
is a "</think>" somewhere before the LAST "<answer>", and a "</answer>" after it. So the loop may
pass either `completion` or `THINK_PREFILL + completion` (policy.Completion.text is the former).
The stop string must be kept in the text (policy.generate keeps it); a response that ends without
"</answer>" (cut off by the length limit, or ended by the model) is a format error, as in the
official code.
Parsers return a small record, or None on a format error, and never raise: they use only str.find
/ rfind (no regular expressions), so they run in linear time on any input.

Where we depart from the official code (and why):
- Prompts are written in our own words and kept short. Each ends with the exact layout of a
  response; the proposer's is a filled-in example, the solver's uses placeholders (a concrete
  example value got copied as the solver's answer: 2/16 well formed against 7/16).
  Measured on the embedded Qwen2.5-Coder-0.5B-Instruct, T = 1, 256 new tokens, one seed
  reference: every proposer wording tried gave 0-6 well-formed proposals in 16 (this one: 6/16,
  then 2/32 on a rerun), so at n = 16 the variants cannot be told apart. The usual failure is the
  model ending its turn right after the python block, with no input block and no "</answer>".
- The proposer is shown the forbidden modules (executor.BANNED_MODULES, the paper's list and more)
  and a few it may use (the executor also refuses any module it has not preloaded:
  executor.ALLOWED_MODULES). The official prompt bans keywords instead.
- Format check: the official code wants "<think>...</think>" immediately followed by "<answer>";
  we only ask that a closed think block comes before the last answer block (text in between is
  ignored). Simpler to state, and it lets "the last <answer> wins" mean what it says.
- The official code renames the first function to `f` and strips comments, prints and code after
  the return; we do none of that: the program must define `f` itself, and the executor runs what
  the model wrote.
- No composite-function proposals and no error-prediction task (the paper's main runs use
  neither).
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass
from typing import Sequence

from executor import ALLOWED_MODULES, BANNED_MODULES

# ------------------------------------------------------------------------------------------------
# Names defined once: task types, roles, format markers

DEDUCTION, ABDUCTION, INDUCTION = "deduction", "abduction", "induction"
TASK_TYPES = (DEDUCTION, ABDUCTION, INDUCTION)
PROPOSE, SOLVE = "propose", "solve"
ROLES = (PROPOSE, SOLVE)

THINK_PREFILL = "<think>"  # pre-filled at the start of the assistant turn
STOP = "</answer>"  # generation stops here (kept in the returned text)

N_INPUTS = 10  # induction: inputs asked of the proposer (paper: N = 10); half shown, half hidden

# The seed of the whole run (paper, Sec. 3.3.1): the identity function is the only outside "data".
SEED_PROGRAM = "def f(a):\n    return a"


# ------------------------------------------------------------------------------------------------
# Records


@dataclass(frozen=True)
class Triplet:
    """One deduction/abduction task: o = p(i)."""

    program: str  # Python source defining `f`
    input: str  # argument text as written: "[1, 2], 3" means f([1, 2], 3)
    output: str  # repr of f(*input): a Python literal, as the executor returns it


SEED_TRIPLET = Triplet(SEED_PROGRAM, "'Hello world'", "'Hello world'")


@dataclass(frozen=True)
class InductionTask:
    """One induction task: the solver sees `message` and `visible`, and is graded on `hidden`."""

    program: str  # the gold program (never shown to the solver)
    message: str  # the proposer's one-line description of f
    visible: tuple[tuple[str, str], ...]  # (input, output) pairs shown to the solver
    hidden: tuple[tuple[str, str], ...]  # (input, output) pairs its program must reproduce


@dataclass(frozen=True)
class Response:
    """A well-formed response split into its two parts."""

    think: str
    answer: str  # the text between the last <answer> and the </answer> after it


@dataclass(frozen=True)
class Proposal:
    """A deduction/abduction proposer's answer: a program and one input for it."""

    program: str
    input: str


@dataclass(frozen=True)
class InductionProposal:
    """An induction proposer's answer: N inputs for the given program and a message."""

    inputs: tuple[str, ...]
    message: str


# ------------------------------------------------------------------------------------------------
# Prompt pieces
#
# Short prompts, each ending with the exact layout of a response (see the module docstring for what
# was measured on the 0.5B model).

ARGS_RULE = "The input is the argument list of one call, as Python literals: `[1, 2], 'ab'` means f([1, 2], 'ab')."

# The proposer's layout example. The model copies it now and then; a copy is not a new task and
# earns the invalid-proposal reward (rewards.py, copies).
EXAMPLE_PROGRAM = (
    "def f(words, n):\n    counts = {}\n    for w in words:\n"
    "        counts[w[:n]] = counts.get(w[:n], 0) + 1\n    return sorted(counts.items())"
)
EXAMPLE_INPUT = "['apple', 'apricot', 'banana'], 2"
EXAMPLE_PROPOSAL = f"```python\n{EXAMPLE_PROGRAM}\n```\n```input\n{EXAMPLE_INPUT}\n```"


def _block(tag: str, body: str) -> str:
    return f"```{tag}\n{body}\n```"


def _triplet_blocks(t: Triplet) -> str:
    return "\n".join([_block("python", t.program), _block("input", t.input), _block("output", t.output)])


def _layout(think: str, *blocks: str) -> str:
    """The exact layout of a response."""
    return f"<think>\n{think}\n</think>\n<answer>\n" + "\n".join(blocks) + "\n</answer>"


def _solver_layout(*blocks: str) -> str:
    return (
        "Reply in exactly this layout: first your reasoning inside <think> </think>, then your "
        "final answer inside <answer> </answer>.\n\n" + _layout("(your step-by-step reasoning)", *blocks)
    )


# ------------------------------------------------------------------------------------------------
# The six prompts


def _propose_program(task_type: str, references: Sequence[Triplet]) -> str:
    """Proposer, deduction or abduction: a new (program, input) pair, given K reference triplets."""
    if task_type == DEDUCTION:
        goal = "another student will be shown the function and the input and must predict the output."
    else:
        goal = (
            "another student will be shown the function and its output for your input and must "
            "find an input that gives that output."
        )
    refs = "\n\n".join(_triplet_blocks(t) for t in references)
    existing = "An existing puzzle" if len(references) == 1 else "Existing puzzles"
    return (
        f"Invent a new Python function `f` and one input for it, as a puzzle: {goal}\n\n"
        f"{existing} (yours must be different and harder):\n\n{refs}\n\n"
        "Rules: `f` takes at least one argument and returns a value; it is deterministic (no "
        "randomness, time, printing or files); it imports none of these modules: "
        f"{', '.join(BANNED_MODULES)}; it may import {', '.join(ALLOWED_MODULES[:10])} and the like. "
        f"{ARGS_RULE}\n\n"
        "Answer in exactly this layout (reasoning in <think>, then the two blocks in <answer>). "
        "Example:\n\n" + _layout("I will count words by their first n letters.", EXAMPLE_PROPOSAL)
    )


def propose_deduction(references: Sequence[Triplet]) -> str:
    """Proposer, deduction: a program and an input whose output is hard to predict."""
    return _propose_program(DEDUCTION, references)


def propose_abduction(references: Sequence[Triplet]) -> str:
    """Proposer, abduction: a program and an input that is hard to recover from the output."""
    return _propose_program(ABDUCTION, references)


def propose_induction(task: Triplet, n_inputs: int = N_INPUTS) -> str:
    """Proposer, induction: N inputs for a given program (from the buffer), plus a message."""
    return (
        f"Here is a Python function, with one input for it:\n\n"
        f"{_block('python', task.program)}\n{_block('input', task.input)}\n\n"
        f"Write {n_inputs} different inputs for it and a one-line message that describes what it "
        "does, as a puzzle: another student will be shown the message and half of your inputs "
        "with their outputs and must write the function, which is then checked on the other half. "
        "Choose inputs that cover different cases. Do not copy the code into the message. "
        f"{ARGS_RULE}\n\n"
        f"Answer in exactly this layout (reasoning in <think>, then {n_inputs} input blocks and one "
        "message block in <answer>). Example:\n\n"
        + _layout(
            "I will cover small, large and edge cases.",
            _block("input", task.input),
            _block("input", "(another input)"),
            f"(... {n_inputs} input blocks in all ...)",
            _block("message", "(one line describing f)"),
        )
    )


def solve_deduction(task: Triplet) -> str:
    """Solver, deduction: given p and i, predict o."""
    return (
        "What does this Python function return for the given input?\n\n"
        f"{_block('python', task.program)}\n{_block('input', task.input)}\n\n"
        "Trace the code step by step, then write the returned value as a Python literal (quotes "
        "around strings, a tuple in parentheses).\n\n" + _solver_layout(_block("output", "..."))
    )


def solve_abduction(task: Triplet) -> str:
    """Solver, abduction: given p and o, find an input i' with p(i') == o."""
    return (
        "Find an input for which this Python function returns the given output.\n\n"
        f"{_block('python', task.program)}\n{_block('output', task.output)}\n\n"
        f"Any input that produces this output is correct. {ARGS_RULE} Put quotes around "
        "strings.\n\n" + _solver_layout(_block("input", "..."))
    )


def solve_induction(task: InductionTask) -> str:
    """Solver, induction: given the message and the visible pairs, write the program f."""
    pairs = "\n\n".join(f"{_block('input', i)}\n{_block('output', o)}" for i, o in task.visible)
    return (
        f"Write the Python function `f` that produced these outputs from these inputs. {ARGS_RULE}\n\n"
        f"Hint from the author: {task.message}\n\n"
        f"{pairs}\n\n"
        "Your function is checked on other inputs of the same kind, so write the general rule, not "
        "a lookup table. It must be deterministic and use no input/output.\n\n"
        + _solver_layout(_block("python", "def f(...):\n    ..."))
    )


# ------------------------------------------------------------------------------------------------
# Parsing. Every function below returns None on a format error and never raises.

_CODE_TAGS = ("python", "py", "")  # an untagged fence counts as code
_MAX_TAG = 16  # a fence tag is a short word; longer runs of letters are body text


def parse_response(text: str) -> Response | None:
    """Split a response into think and answer; None unless a closed <think> precedes the answer.

    The last <answer> wins; it needs a </answer> after it and a </think> before it. The opening
    <think> may be absent (it is the prefill).
    """
    a = text.rfind("<answer>")
    if a < 0:
        return None
    e = text.find("</answer>", a)
    t = text.rfind("</think>", 0, a)
    if e < 0 or t < 0:
        return None
    s = text.rfind("<think>", 0, t)
    think = text[s + len("<think>") : t] if s >= 0 else text[:t]
    return Response(think=think.strip(), answer=text[a + len("<answer>") : e].strip())


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """All ```tag ... ``` blocks in `text`, in order, as (lowercase tag, body).

    The tag is the run of letters right after the opening fence (at most 16); the body is what
    follows, up to the next fence. An unclosed fence ends the scan.
    """
    blocks, pos = [], 0
    while True:
        start = text.find("```", pos)
        if start < 0:
            return blocks
        i = j = start + 3
        while j < min(len(text), i + _MAX_TAG) and text[j].isascii() and text[j].isalpha():
            j += 1
        tag = text[i:j].lower()
        end = text.find("```", j)
        if end < 0:
            return blocks
        blocks.append((tag, text[j:end]))
        pos = end + 3


def _code(body: str) -> str:
    return textwrap.dedent(body.strip("\r\n")).strip()


def _last(blocks: list[tuple[str, str]], tags: Sequence[str]) -> str | None:
    for tag, body in reversed(blocks):
        if tag in tags:
            return body
    return None


def parse_proposal(text: str) -> Proposal | None:
    """Deduction/abduction proposer: the last python block and the last input block of the answer."""
    resp = parse_response(text)
    if resp is None:
        return None
    blocks = fenced_blocks(resp.answer)
    program, inp = _last(blocks, _CODE_TAGS), _last(blocks, ("input",))
    if program is None or inp is None or not _code(program) or not inp.strip():
        return None
    return Proposal(program=_code(program), input=inp.strip())


def parse_induction_proposal(text: str, n_inputs: int = N_INPUTS) -> InductionProposal | None:
    """Induction proposer: at least n_inputs input blocks (the last n_inputs are kept, as in the
    official code) and a message block (the last one)."""
    resp = parse_response(text)
    if resp is None:
        return None
    blocks = fenced_blocks(resp.answer)
    inputs = [body.strip() for tag, body in blocks if tag == "input" and body.strip()]
    message = _last(blocks, ("message",))
    if len(inputs) < n_inputs or message is None or not message.strip():
        return None
    return InductionProposal(inputs=tuple(inputs[len(inputs) - n_inputs :]), message=message.strip())


def parse_solution(task_type: str, text: str) -> str | None:
    """Solver: the answer text to grade, or None on a format error.

    induction: the last python block (or untagged block). deduction / abduction: the last block
    tagged output / input (an untagged block also counts); an answer with no fences at all is read
    as the value itself (`<answer>42</answer>`), as the official code falls back to the whole answer.
    """
    resp = parse_response(text)
    if resp is None:
        return None
    blocks = fenced_blocks(resp.answer)
    if task_type == INDUCTION:
        body = _last(blocks, _CODE_TAGS)
        body = None if body is None else _code(body)
    elif task_type in (DEDUCTION, ABDUCTION):
        body = _last(blocks, ("output" if task_type == DEDUCTION else "input", ""))
        if body is None and "```" not in resp.answer:
            body = resp.answer
        body = None if body is None else body.strip()
    else:
        return None
    return body or None


# ------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    sample = Triplet(
        program="def f(nums, k):\n    out = []\n    for n in nums:\n        if n % k == 0:\n"
        "            out.append(n // k)\n    return sorted(out, reverse=True)",
        input="[6, 7, 9, 12], 3",
        output="[4, 3, 2]",
    )
    induction = InductionTask(
        program=sample.program,
        message="Keeps the numbers divisible by k, divides them by k, largest first.",
        visible=(("[6, 7, 9, 12], 3", "[4, 3, 2]"), ("[10, 4, 5], 5", "[2, 1]")),
        hidden=(("[1, 2, 3], 2", "[1]"),),
    )
    shown = [
        ("propose / deduction", propose_deduction([SEED_TRIPLET, sample])),
        ("propose / abduction", propose_abduction([SEED_TRIPLET, sample])),
        ("propose / induction", propose_induction(sample)),
        ("solve / deduction", solve_deduction(sample)),
        ("solve / abduction", solve_abduction(sample)),
        ("solve / induction", solve_induction(induction)),
    ]
    for title, message in shown:
        print(f"{'=' * 30} {title} {'=' * 30}\n{message}\n")
    print(f"(the assistant turn starts with {THINK_PREFILL!r}; generation stops at {STOP!r})")
