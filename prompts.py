"""What each role is asked, and how its answer is read.

In the paper (Zhao et al. 2025, Sec. 3.2-3.3 and Algorithm 1) one model plays two roles on three
task types, all built from a triplet (program p, input i, output o = p(i)):

    type        proposer writes                       solver sees          solver writes
    deduction   p and i  (given K reference triplets)  p, i                 o
    abduction   p and i  (given K reference triplets)  p, o                 an input i'
    induction   N inputs + a message m for a given p  m, half the (i, o)   a program p'

This file holds the six prompts, the records those tasks are stored in, and the parsers that read a
sampled response; also the prompts of two benchmarks the loop never trains on (HumanEval, GSM8K:
solve_code, solve_math), asked in the same format for evaluate.py. A prompt is a Chat: the format rule in a system message, one worked example as
an earlier exchange (a request of the same kind and its complete response), then the request.
Rendering it with the model's chat template, or as plain "User: / Assistant:" text for a base
model, is policy.format_chat's job. `python prompts.py` prints all six for a sample task, system
message and example turns included: exactly what the model sees.

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
- Prompts are written in our own words, and each comes after a system message and a worked
  example (the official prompts are one long user message with the rules and a layout). On the
  embedded Qwen2.5-Coder-0.5B-Instruct this is what made the format stick (bench/bench_play.py;
  the README's "Does the model play the game at step 0?" has the figures of every lever below).
- Deduction and abduction solvers answer the bare value inside <answer> (the official parser
  accepts that too), and every request ends by asking for the closing "</answer>". The usual
  failure left is the chat model ending its turn right after a code block.
- The proposers' worked example shows a reference that is not the seed triplet: during seeding
  the real request shows the seed alone, and a request identical to the example's got the example's
  answer back, a copy.
- The induction proposer writes its message block first and labels its inputs "Input 1:", ...
  (text outside the fences is ignored): unlabelled, the model wrote one or two inputs too few.
- The proposer is told a few modules it may import (PROMPT_MODULES); the executor refuses any
  module outside executor.ALLOWED_MODULES and everything in executor.BANNED_MODULES anyway. The
  official prompt lists banned keywords instead.
- Format check: the official code wants "<think>...</think>" immediately followed by "<answer>";
  we only ask that a closed think block comes before the last answer block (text in between is
  ignored). Simpler to state, and it lets "the last <answer> wins" mean what it says.
- Reading the answer, on purpose unlike the official code: the LAST message block counts (theirs:
  the first); empty input blocks are dropped before the N inputs are counted; text between and
  around the fenced blocks is ignored; the plain forms of a deduction/abduction answer ("The
  output is X", "<output>X</output>", "# Output: X") are read only when they are the whole answer
  (theirs are searched for anywhere, which misreads "the output is x" in a sentence and `output(1)`).
  As in the official code, a tagged block always wins over an untagged one (parse_solution and
  parse_proposal state the rules).
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


# ------------------------------------------------------------------------------------------------
# Names defined once: task types, roles, format markers

DEDUCTION, ABDUCTION, INDUCTION = "deduction", "abduction", "induction"
TASK_TYPES = (DEDUCTION, ABDUCTION, INDUCTION)
PROPOSE, SOLVE = "propose", "solve"
ROLES = (PROPOSE, SOLVE)

THINK_PREFILL = "<think>"  # pre-filled at the start of the assistant turn
STOP = "</answer>"  # generation stops here (kept in the returned text)

N_INPUTS = 6  # induction: inputs asked of the proposer, half shown, half hidden; --n-inputs (paper: N = 10)

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


def task_key(task: Triplet | InductionTask) -> tuple:
    """What makes a task the same task (a buffer holds each once): its program and input(s)."""
    if isinstance(task, Triplet):
        return task.program, task.input
    return task.program, tuple(i for i, _ in task.visible + task.hidden)


def task_from_json(task_type: str, data: dict) -> Triplet | InductionTask:
    """A task from its JSON form (dataclasses.asdict of it), as buffers, reports and samples store it."""
    if task_type == INDUCTION:
        return InductionTask(data["program"], data["message"], tuple(map(tuple, data["visible"])),
                             tuple(map(tuple, data["hidden"])))
    return Triplet(**data)


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


@dataclass(frozen=True)
class Chat:
    """What the model is shown for one request: the system message, worked examples as earlier turns
    (request, complete response), and the request. policy.format_chat renders it."""

    user: str  # the request itself
    system: str = ""
    examples: tuple[tuple[str, str], ...] = ()  # (user, assistant) turns shown before the request

    def messages(self) -> list[dict[str, str]]:
        out = [{"role": "system", "content": self.system}] if self.system else []
        for request, response in self.examples:
            out += [{"role": "user", "content": request}, {"role": "assistant", "content": response}]
        return out + [{"role": "user", "content": self.user}]


# ------------------------------------------------------------------------------------------------
# Prompt pieces
#
# Every prompt is a Chat: the format rule in a system message (the same for all six), one worked
# example as an earlier exchange (a request of the same kind and its complete response), then the
# real request. A 0.5B model copies a layout it has seen answered far more reliably than one it is
# told about (bench/bench_play.py; the figures are in the module docstring).

SYSTEM = (
    "You invent and solve small Python puzzles. Every reply has exactly two parts: first your "
    "reasoning inside <think> </think>, then your final answer inside <answer> </answer>. Close the "
    "reasoning with </think> and the answer with </answer>, and write nothing after </answer>."
)

ARGS_RULE = "The input is the argument list of one call, as Python literals: `[1, 2], 'ab'` means f([1, 2], 'ab')."
# The abduction solver's version has no literal in it: after an empty <think>, the literal of the
# instructions became the trained model's default guess (40 of 64 CRUXEval-I answers at step 30
# were `[1, 2], 'ab'`; at step 0, 9 of 32 bench_play answers, and 0 with this rule). The induction
# solver writes a program, not a value, and keeps ARGS_RULE: with this rule its well-formed share
# fell from 69% to 47% (n = 32, bench_play).
CALL_RULE = ("An input is written as the arguments stand between the parentheses of a call f(...): Python "
             "literals, separated by commas when f takes more than one.")
# A short list the proposer may import (the executor allows all of ALLOWED_MODULES and refuses the rest).
PROMPT_MODULES = ("math", "itertools", "collections", "functools", "string", "re", "heapq", "bisect")
MODULES_RULE = "it imports nothing, or only " + ", ".join(PROMPT_MODULES)

@dataclass(frozen=True)
class ProposerExample:
    """A worked example for the three proposers: one program, seen as a deduction/abduction proposal
    (program and input, with the reasoning that led to it) and as an induction proposal (a message
    and inputs for it, each covering a case)."""

    program: str
    input: str
    summary: str  # what f does, as the induction example's reasoning says it
    message: str
    induction_inputs: tuple[tuple[str, str], ...]  # (input, the case it covers): the first N are shown
    think: tuple[str, str]  # the deduction proposer's reasoning, the abduction proposer's
    marks: tuple[str, ...]  # what a task borrows from it when it is not a copy: signature, input words


# The proposers' worked examples. The model copies them now and then; a copy is not a new task and
# earns the invalid-proposal reward (rewards.py, copies). A prompt shows one; with one example for
# every prompt, the trained proposer drifted towards its words and signature (README), so
# --worked-examples N draws each prompt's example from the first N.
PROPOSER_EXAMPLES = (
    ProposerExample(
        program="def f(words, n):\n    counts = {}\n    for w in words:\n"
                "        counts[w[:n]] = counts.get(w[:n], 0) + 1\n    return sorted(counts.items())",
        input="['apple', 'apricot', 'banana'], 2",
        summary="f counts words by their first n letters",
        message="Counts the words by their first n letters; returns (prefix, count) pairs sorted by prefix.",
        induction_inputs=(
            ("['apple', 'apricot', 'banana'], 2", "two words share a prefix"),
            ("['cat', 'car', 'dog', 'cow'], 1", "n = 1"),
            ("[], 3", "no words"),
            ("['aa', 'ab', 'ba'], 2", "words as long as n"),
            ("['x'], 5", "n longer than the word"),
            ("['tree', 'trip', 'tram', 'toy'], 2", "three prefixes"),
            ("['a', 'b', 'a'], 1", "a repeated word"),
            ("['hello', 'help', 'hold'], 3", "n = 3"),
            ("['one', 'two', 'three'], 0", "n = 0"),
            ("['abc', 'abd'], 3", "two different prefixes"),
            ("['sun', 'sea', 'sky', 'moon'], 1", "one prefix three times"),
            ("['ab'], 1", "one word"),
        ),
        think=("The existing puzzle only doubles a number. A harder one needs a loop and a dictionary: I "
               "will count words by their first n letters and return the sorted counts, so the solver "
               "must track the slices, the counts and the sorting.",
               "The existing puzzle only doubles a number, so its input is easy to recover. In mine the "
               "output is a sorted list of (prefix, count) pairs: the solver must invent words with "
               "those prefixes, the right number of each, and find n."),
        marks=("f(words, n)", "'apple'", "'apricot'", "'banana'"),
    ),
    ProposerExample(
        program="def f(grid):\n    total = 0\n    for r, row in enumerate(grid):\n"
                "        for c, v in enumerate(row):\n            if (r + c) % 2 == 0:\n"
                "                total += v\n    return total",
        input="[[1, 2, 3], [4, 5, 6]]",
        summary="f adds the numbers on the squares where row + column is even, a chessboard pattern",
        message="Adds the numbers on a chessboard pattern of the grid, starting with the top-left square.",
        induction_inputs=(
            ("[[1, 2, 3], [4, 5, 6]]", "two rows"),
            ("[[7]]", "one square"),
            ("[]", "no rows"),
            ("[[0, 9, 0], [9, 0, 9], [0, 9, 0]]", "only the skipped squares are large"),
            ("[[-1, 2], [3, -4]]", "negative numbers"),
            ("[[5, 5, 5, 5]]", "one row"),
            ("[[1], [2], [3]]", "one column"),
            ("[[2, 3], []]", "an empty row"),
            ("[[10, 20], [30, 40], [50, 60]]", "three rows"),
            ("[[1, 1], [1, 1]]", "all equal"),
            ("[[1, 2, 3, 4], [5, 6, 7, 8]]", "an even width"),
            ("[[100]]", "one large number"),
        ),
        think=("The existing puzzle only doubles a number. A harder one needs two loops and a condition on "
               "the position: I will add the numbers whose row plus column is even, so the solver must "
               "track both indices.",
               "The existing puzzle only doubles a number, so its input is easy to recover. In mine the "
               "output is one sum over a pattern of positions: the solver must build a grid whose "
               "squares on the pattern add up to it."),
        marks=("f(grid)", "[[1, 2, 3], [4, 5, 6]]"),
    ),
    ProposerExample(
        program="def f(text, sep):\n    out = []\n    for piece in text.split(sep):\n        if piece:\n"
                "            out.append(piece[::-1] if len(piece) % 2 else piece.upper())\n"
                "    return '-'.join(out)",
        input="'ab,cde,,f', ','",
        summary="f splits the text at sep, drops empty pieces, reverses the odd-length ones and "
                "upper-cases the others, then joins them with '-'",
        message="Splits the text at sep, drops empty pieces, reverses odd-length pieces, upper-cases "
                "even-length ones, joins with '-'.",
        induction_inputs=(
            ("'ab,cde,,f', ','", "an empty piece"),
            ("'hello world', ' '", "two odd-length words"),
            ("'', ','", "empty text"),
            ("'abcd', ','", "no separator in the text"),
            ("'a;bb;ccc', ';'", "lengths one to three"),
            ("',,,', ','", "only separators"),
            ("'xy|xy', '|'", "a repeated piece"),
            ("'one two three', ' '", "three words"),
            ("'race car', ' '", "a palindrome"),
            ("'ab-cd', '-'", "the separator is the joiner"),
            ("'q', ','", "one letter"),
            ("'mo,on', ','", "two even pieces"),
        ),
        think=("The existing puzzle only doubles a number. A harder one works on text: I will split it, "
               "drop the empty pieces and change each piece by the parity of its length, so the solver "
               "must follow the split, the lengths and the join.",
               "The existing puzzle only doubles a number, so its input is easy to recover. In mine the "
               "output joins changed pieces: the solver must undo the reversing and the upper-casing "
               "and choose a separator."),
        marks=("f(text, sep)", "'ab,cde,,f'"),
    ),
)
EXAMPLE = PROPOSER_EXAMPLES[0]  # the one every prompt shows with --worked-examples 1 (the default)
EXAMPLE_PROGRAM, EXAMPLE_INPUT = EXAMPLE.program, EXAMPLE.input
# The reference the proposers' example request shows. Not the seed triplet: during seeding the real
# request shows the seed alone, and a request identical to the example's got the example's answer
# back, a copy (1 valid task in a 64-proposal seeding round).
EXAMPLE_REFERENCE = Triplet("def f(x):\n    return x * 2", "21", "42")
# Everything a proposer's prompt may show as a program besides its buffer's tasks: a proposal that
# repeats one of these is a copy (rewards.known_proposals).
EXAMPLE_PROGRAMS = tuple(e.program for e in PROPOSER_EXAMPLES) + (EXAMPLE_REFERENCE.program,)

# The solvers' worked example: one task seen three ways.
SOLVER_EXAMPLE = Triplet(
    program="def f(nums, k):\n    out = []\n    for n in nums:\n        if n % k == 0:\n"
    "            out.append(n // k)\n    return sorted(out, reverse=True)",
    input="[6, 7, 9, 12], 3",
    output="[4, 3, 2]",
)
SOLVER_EXAMPLE_INDUCTION = InductionTask(
    program=SOLVER_EXAMPLE.program,
    message="Keeps the numbers divisible by k, divides them by k, largest first.",
    visible=(("[6, 7, 9, 12], 3", "[4, 3, 2]"), ("[10, 4, 5], 5", "[2, 1]"), ("[1, 2, 3], 2", "[1]")),
    hidden=(("[8, 16], 8", "[2, 1]"), ("[5, 7], 3", "[]"), ("[0, 9], 9", "[1, 0]")),
)


def _block(tag: str, body: str) -> str:
    return f"```{tag}\n{body}\n```"


def _triplet_blocks(t: Triplet) -> str:
    return "\n".join([_block("python", t.program), _block("input", t.input), _block("output", t.output)])


def _reply(reason: str, answer: str) -> str:
    """The sentence every request ends with: where the reasoning and the answer go, and the close."""
    return f"{reason} in <think> </think>, then {answer} in <answer> </answer>, and end your reply with {STOP}."


def _response(think: str, *answer: str) -> str:
    """A complete response, as a worked example shows it (the real one starts after THINK_PREFILL)."""
    return f"{THINK_PREFILL}\n{think}\n</think>\n<answer>\n" + "\n".join(answer) + f"\n{STOP}"


# ------------------------------------------------------------------------------------------------
# The six requests (the user message alone)


def _program_request(task_type: str, references: Sequence[Triplet]) -> str:
    """Proposer, deduction or abduction: a new (program, input) pair, given K reference triplets."""
    if task_type == DEDUCTION:
        goal = "another student will be shown the function and the input and must predict the output."
    else:
        goal = ("another student will be shown the function and its output for your input and must "
                "find an input that gives that output.")
    refs = "\n\n".join(_triplet_blocks(t) for t in references)
    existing = "An existing puzzle" if len(references) == 1 else "Existing puzzles"
    return (
        f"Invent a new Python function `f` and one input for it, as a puzzle: {goal}\n\n"
        f"{existing} (yours must be new and harder):\n\n{refs}\n\n"
        "Rules: `f` takes at least one argument and returns a value; it is deterministic (no "
        f"randomness, time, printing or files); {MODULES_RULE}. {ARGS_RULE}\n\n"
        + _reply("Reason", "give one python block and one input block")
    )


def _induction_request(task: Triplet, n_inputs: int) -> str:
    """Proposer, induction: N inputs for a given program (from the buffer), plus a message."""
    return (
        f"Here is a Python function, with one input for it:\n\n"
        f"{_block('python', task.program)}\n{_block('input', task.input)}\n\n"
        f"Write {n_inputs} different inputs for it (the one above counts as one of them if you use it) "
        "and a one-line message that describes what it does, as a puzzle: another student will be "
        "shown the message and half of your inputs with their outputs and must write the function, "
        "which is then checked on the other half. Cover different cases. Do not copy the code into "
        f"the message. {ARGS_RULE}\n\n"
        + _reply("Reason", f"give one message block and exactly {n_inputs} input blocks")
    )


def _deduction_request(task: Triplet) -> str:
    return (
        "What does this Python function return for the given input?\n\n"
        f"{_block('python', task.program)}\n{_block('input', task.input)}\n\n"
        + _reply("Trace the code step by step",
                 "write only the returned value, as a Python literal (quotes around strings),")
    )


def _abduction_request(task: Triplet) -> str:
    return (
        "Find an input for which this Python function returns the given output.\n\n"
        f"{_block('python', task.program)}\n{_block('output', task.output)}\n\n"
        f"Any input that gives this output is correct. {CALL_RULE} " + _reply("Reason", "write only the input")
    )


def _induction_solve_request(task: InductionTask) -> str:
    pairs = "\n\n".join(f"{_block('input', i)}\n{_block('output', o)}" for i, o in task.visible)
    return (
        f"Write the Python function `f` that produced these outputs from these inputs. {ARGS_RULE}\n\n"
        f"Hint from the author: {task.message}\n\n{pairs}\n\n"
        "Your function is checked on other inputs of the same kind, so write the general rule, not "
        "a lookup table. " + _reply("Reason", "give the function in one python block")
    )


# ------------------------------------------------------------------------------------------------
# The worked examples: one (request, complete response) turn per kind of prompt


def reuses_example(*texts: str) -> bool:
    """Whether a proposal's program or inputs carry a mark of a proposers' worked example (its
    signature, the words of its input; up to the quotes used). A diversity signal
    (run.step_metrics, example_reuse), not a rule."""
    text = " ".join(texts).replace('"', "'")
    return any(mark in text for example in PROPOSER_EXAMPLES for mark in example.marks)


def example_induction_inputs(n_inputs: int, example: int = 0) -> tuple[str, ...]:
    """The inputs the induction proposer's worked example shows (as many as asked, up to 12)."""
    return tuple(i for i, _ in PROPOSER_EXAMPLES[example].induction_inputs[:n_inputs])


def worked_example(task_type: str, role: str, n_inputs: int = N_INPUTS, example: int = 0) -> tuple[str, str]:
    """The earlier turn shown before every request of this (task type, role): a request of the same
    kind, about the example task, and its complete response. `example` picks a proposers' example."""
    if role == PROPOSE:
        shown = PROPOSER_EXAMPLES[example]
        if task_type == INDUCTION:
            cases = shown.induction_inputs[:n_inputs]
            plan = "; ".join(f"{k}. {why}" for k, (_, why) in enumerate(cases, 1))
            return _induction_request(Triplet(shown.program, shown.input, ""), len(cases)), _response(
                f"{shown.summary}. My {len(cases)} inputs: {plan}.",
                _block("message", shown.message),
                *[f"Input {k}:\n" + _block("input", i) for k, (i, _) in enumerate(cases, 1)])
        think = shown.think[0] if task_type == DEDUCTION else shown.think[1]
        return _program_request(task_type, [EXAMPLE_REFERENCE]), _response(
            think, _block("python", shown.program), _block("input", shown.input))
    if task_type == DEDUCTION:
        return _deduction_request(SOLVER_EXAMPLE), _response(
            "k = 3. 6 % 3 == 0: append 6 // 3 = 2. 7 % 3 == 1: skip. 9 % 3 == 0: append 3. "
            "12 % 3 == 0: append 4. out = [2, 3, 4], sorted in reverse: [4, 3, 2].",
            SOLVER_EXAMPLE.output)  # the bare value: no fence to get wrong
    if task_type == ABDUCTION:
        return _abduction_request(SOLVER_EXAMPLE), _response(
            "The output holds n // k for the numbers n divisible by k, largest first. With k = 2, the "
            "numbers 8, 6 and 4 give 4, 3 and 2; 5 is not divisible by 2, so it is dropped. Check: "
            "[4, 5, 6, 8], 2 gives [2, 3, 4], sorted in reverse [4, 3, 2].",
            "[4, 5, 6, 8], 2")
    return _induction_solve_request(SOLVER_EXAMPLE_INDUCTION), _response(
        "Each output holds n // k for the numbers n in the list that k divides, largest first: "
        "[6, 7, 9, 12], 3 keeps 6, 9 and 12 and gives [4, 3, 2].",
        _block("python", SOLVER_EXAMPLE.program))


def chat(task_type: str, role: str, request: str, n_inputs: int = N_INPUTS, example: int = 0) -> Chat:
    """A request with the system message and its worked example in front."""
    return Chat(user=request, system=SYSTEM, examples=(worked_example(task_type, role, n_inputs, example),))


# ------------------------------------------------------------------------------------------------
# The six prompts


def propose_deduction(references: Sequence[Triplet], example: int = 0) -> Chat:
    """Proposer, deduction: a program and an input whose output is hard to predict."""
    return chat(DEDUCTION, PROPOSE, _program_request(DEDUCTION, references), example=example)


def propose_abduction(references: Sequence[Triplet], example: int = 0) -> Chat:
    """Proposer, abduction: a program and an input that is hard to recover from the output."""
    return chat(ABDUCTION, PROPOSE, _program_request(ABDUCTION, references), example=example)


def propose_induction(task: Triplet, n_inputs: int = N_INPUTS, example: int = 0) -> Chat:
    """Proposer, induction: N inputs for a given program (from the buffer), plus a message."""
    return chat(INDUCTION, PROPOSE, _induction_request(task, n_inputs), n_inputs, example)


def solve_deduction(task: Triplet) -> Chat:
    """Solver, deduction: given p and i, predict o."""
    return chat(DEDUCTION, SOLVE, _deduction_request(task))


def solve_abduction(task: Triplet) -> Chat:
    """Solver, abduction: given p and o, find an input i' with p(i') == o."""
    return chat(ABDUCTION, SOLVE, _abduction_request(task))


def solve_induction(task: InductionTask) -> Chat:
    """Solver, induction: given the message and the visible pairs, write the program f."""
    return chat(INDUCTION, SOLVE, _induction_solve_request(task))


SOLVER_TEMPLATES = {DEDUCTION: solve_deduction, ABDUCTION: solve_abduction, INDUCTION: solve_induction}


# ------------------------------------------------------------------------------------------------
# Two transfer benchmarks (evaluate.py): tasks the loop never trains on, asked in the same format,
# with a worked example of their own. CRUXEval uses solve_deduction / solve_abduction as they are.

CODE_EXAMPLE = (  # a HumanEval-style problem: signature and docstring, the body to write
    "def count_vowels(s: str) -> int:\n"
    '    """Return how many letters of s are vowels (a, e, i, o, u), ignoring case.\n'
    "    >>> count_vowels('Hello')\n    2\n    \"\"\"\n"
)
CODE_EXAMPLE_SOLUTION = "def count_vowels(s: str) -> int:\n    return sum(1 for c in s.lower() if c in 'aeiou')"
MATH_EXAMPLE = ("A baker makes 12 muffins a day and packs them in boxes of 4. How many boxes does she "
                "fill in 5 days?", "15")


def _code_request(problem: str) -> str:
    return (
        f"Complete this Python function.\n\n{_block('python', problem.rstrip())}\n\n"
        "It is run against hidden tests. "
        + _reply("Reason", "give the whole function, with any imports it needs, in one python block")
    )


def _math_request(question: str) -> str:
    return f"Solve this math problem.\n\n{question}\n\n" + _reply("Reason step by step", "write only the final number")


def solve_code(problem: str) -> Chat:
    """HumanEval: complete a function from its signature and docstring."""
    return Chat(user=_code_request(problem), system=SYSTEM, examples=((_code_request(CODE_EXAMPLE), _response(
        "A vowel is one of a, e, i, o, u; lower-case s first so that case does not matter. "
        "'Hello' has e and o: 2.", _block("python", CODE_EXAMPLE_SOLUTION))),))


def solve_math(question: str) -> Chat:
    """GSM8K: a word problem, answered with the final number."""
    return Chat(user=_math_request(question), system=SYSTEM, examples=((_math_request(MATH_EXAMPLE[0]), _response(
        "12 muffins a day for 5 days is 12 * 5 = 60 muffins. 60 / 4 = 15 boxes.", MATH_EXAMPLE[1])),))


# ------------------------------------------------------------------------------------------------
# Parsing. Every function below returns None on a format error and never raises.

_CODE_TAGS = ("python", "py")  # a fence tagged as code
_UNTAGGED = ""
_MAX_TAG = 16  # a fence tag is a short word; longer runs of letters are body text
# Plainly stated answers, read only when one is the WHOLE answer (any letter case, no fences), as
# (opening, closing) around the value. The first pair drops a sentence's final period.
_STATED = {
    DEDUCTION: (("the output is", "."), ("the output is", ""), ("<output>", "</output>"), ("# output:", "")),
    ABDUCTION: (("the input is", "."), ("the input is", ""), ("<input>", "</input>"), ("# input:", "")),
}


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


def thinks_empty(text: str) -> bool:
    """A well-formed response whose <think> block is empty: an answer given without reasoning.
    A health signal: a solver that rarely succeeds can learn to stop thinking, when its few
    rewarded answers happen to skip the reasoning (see the README's learning curve)."""
    response = parse_response(text)
    return response is not None and not response.think


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


def _program(blocks: list[tuple[str, str]], untagged_needs_f: bool) -> str | None:
    """The last block tagged as code; with none tagged, the last untagged block (that defines `f`,
    if asked: an untagged fence after a proposer's code often holds an example call or a value)."""
    body = _last(blocks, _CODE_TAGS)
    if body is None:
        untagged = [b for tag, b in blocks if tag == _UNTAGGED and ("def f(" in b or not untagged_needs_f)]
        body = untagged[-1] if untagged else None
    return None if body is None else _code(body)


def _stated_value(task_type: str, answer: str) -> str:
    """The value of a plainly stated answer ("The output is 3.", "<output>3</output>", "# Output: 3"),
    or the answer itself when it is not one of these forms as a whole."""
    lowered = answer.lower()
    for opening, closing in _STATED[task_type]:
        if lowered.startswith(opening) and lowered.endswith(closing) and len(answer) > len(opening) + len(closing):
            value = answer[len(opening) : len(answer) - len(closing)].strip()
            if value:
                return value
    return answer


def parse_proposal(text: str) -> Proposal | None:
    """Deduction/abduction proposer: a program and one input, from the answer's fenced blocks.

    The program is the last block tagged python (or py); with none tagged, the last untagged block
    that defines `f` (an untagged block after the code that holds an expected output or a call is
    not the program). The input is the last block tagged input. Either missing or empty: None.
    """
    resp = parse_response(text)
    if resp is None:
        return None
    blocks = fenced_blocks(resp.answer)
    program, inp = _program(blocks, untagged_needs_f=True), _last(blocks, ("input",))
    if not program or inp is None or not inp.strip():
        return None
    return Proposal(program=program, input=inp.strip())


def parse_induction_proposal(text: str, n_inputs: int = N_INPUTS) -> InductionProposal | None:
    """Induction proposer: at least n_inputs non-empty input blocks (the last n_inputs are kept, as
    in the official code; empty ones are dropped) and a message block (the last non-empty one)."""
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
    """Solver: the answer text to grade, or None on a format error. A tagged block always wins over
    untagged ones, whatever their order; text around the blocks is ignored.

    induction: the last block tagged python (or py); with none tagged, the last untagged block.
    deduction / abduction, the first rule that applies:
      1. the last block tagged output (deduction) / input (abduction);
      2. else the last untagged block, or block tagged as code (a value in a python fence);
      3. else, if the answer has no fences at all: the value of a plainly stated answer, when the
         whole answer is "The output is X" (the period after X dropped), "<output>X</output>" or
         "# Output: X" (input for abduction; any letter case), and otherwise the answer itself,
         as in `<answer>42</answer>`. The official code tries similar phrasings unanchored, in
         the middle of any text, and falls back to the whole answer last;
      4. else (only blocks of other tags): None.
    An empty value is None.
    """
    resp = parse_response(text)
    if resp is None:
        return None
    blocks = fenced_blocks(resp.answer)
    if task_type == INDUCTION:
        return _program(blocks, untagged_needs_f=False) or None
    if task_type not in (DEDUCTION, ABDUCTION):
        return None
    body = _last(blocks, ("output" if task_type == DEDUCTION else "input",))
    if body is None:
        body = _last(blocks, (_UNTAGGED, *_CODE_TAGS))
    if body is None and "```" not in resp.answer:
        body = _stated_value(task_type, resp.answer)
    return None if body is None else body.strip() or None


# ------------------------------------------------------------------------------------------------

if __name__ == "__main__":
    # A sample task of the kind the buffers hold (not the worked examples' own).
    sample = Triplet(program="def f(s):\n    return s[::-1].upper()", input="'abc'", output="'CBA'")
    induction = InductionTask(
        program=sample.program, message="Reverses the string and makes it upper case.",
        visible=(("'abc'", "'CBA'"), ("'Hello'", "'OLLEH'")), hidden=(("''", "''"), ("'a b'", "'B A'")),
    )
    shown = [
        ("propose / deduction", propose_deduction([SEED_TRIPLET, sample])),
        ("propose / abduction", propose_abduction([SEED_TRIPLET, sample])),
        ("propose / induction", propose_induction(sample)),
        ("solve / deduction", solve_deduction(sample)),
        ("solve / abduction", solve_abduction(sample)),
        ("solve / induction", solve_induction(induction)),
    ]
    for title, chat in shown:
        print(f"{'#' * 30} {title} {'#' * 30}")
        for message in chat.messages():
            print(f"--- {message['role']} ---\n{message['content']}")
        print()
    print(f"(the assistant turn starts with {THINK_PREFILL!r}; generation stops at {STOP!r})")
