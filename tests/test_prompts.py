"""prompts.py: the six prompts, and parsers that read any string without raising."""

import subprocess
import sys
import time
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

import prompts
from prompts import (
    ABDUCTION,
    DEDUCTION,
    INDUCTION,
    PROPOSE,
    SEED_TRIPLET,
    SOLVE,
    InductionProposal,
    InductionTask,
    Proposal,
    Response,
    Triplet,
    fenced_blocks,
    parse_induction_proposal,
    parse_proposal,
    parse_response,
    parse_solution,
    thinks_empty,
)

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = Triplet("def f(x, k):\n    return [v * k for v in x]", "[1, 2], 3", "[3, 6]")


def respond(*blocks: str, think: str = "plan") -> str:
    """A well-formed completion as the model writes it after the <think> prefill."""
    return f" {think} </think>\n<answer>\n" + "\n".join(blocks) + "\n</answer>"


def block(tag: str, body: str) -> str:
    return f"```{tag}\n{body}\n```"


# ------------------------------------------------------------------------------------------------
# Prompts


def six_prompts():
    ind = InductionTask("def f(a):\n    return a * 2", "doubles its argument", (("3", "6"), ("'ab'", "'abab'")), (("[1]", "[1, 1]"),))
    return ind, [
        (PROPOSE, DEDUCTION, prompts.propose_deduction([SEED_TRIPLET, SAMPLE]), ["```python\ndef f(a):", "'Hello world'", "[3, 6]", "predict the output"]),
        (PROPOSE, ABDUCTION, prompts.propose_abduction([SAMPLE]), [SAMPLE.program, "```input\n[1, 2], 3\n```", "find an input"]),
        (PROPOSE, INDUCTION, prompts.propose_induction(SAMPLE, n_inputs=7), ["Write 7 different inputs", "message block", SAMPLE.program, "[1, 2], 3"]),
        (SOLVE, DEDUCTION, prompts.solve_deduction(SAMPLE), [SAMPLE.program, "```input\n[1, 2], 3\n```", "returned value"]),
        (SOLVE, ABDUCTION, prompts.solve_abduction(SAMPLE), [SAMPLE.program, "```output\n[3, 6]\n```", "only the input"]),
        (SOLVE, INDUCTION, prompts.solve_induction(ind), ["doubles its argument", "```input\n'ab'\n```", "```output\n'abab'\n```", "python block"]),
    ]


def parse_as(role: str, task_type: str, text: str, n_inputs: int = 7):
    if role == PROPOSE:
        return parse_induction_proposal(text, n_inputs) if task_type == INDUCTION else parse_proposal(text)
    return parse_solution(task_type, text)


def test_six_prompts_are_a_system_message_a_worked_example_and_the_request():
    ind, shown = six_prompts()
    for role, task_type, chat, must in shown:
        assert chat.system == prompts.SYSTEM and len(chat.examples) == 1
        assert [m["role"] for m in chat.messages()] == ["system", "user", "assistant", "user"]
        example_request, example_response = chat.examples[0]
        # the example is a request of the same kind, and its response is complete and parses as one
        assert example_request.split("\n")[0] == chat.user.split("\n")[0]
        assert example_response.startswith(prompts.THINK_PREFILL) and example_response.endswith(prompts.STOP)
        assert parse_as(role, task_type, example_response) is not None, (role, task_type)
        for m in must:
            assert m in chat.user, (role, task_type, m)
    # the solver never sees what it must produce
    assert "[3, 6]" not in prompts.solve_deduction(SAMPLE).user
    assert "[1, 2], 3" not in prompts.solve_abduction(SAMPLE).user
    assert "[1, 1]" not in prompts.solve_induction(ind).user and ind.program not in prompts.solve_induction(ind).user


def test_worked_examples_are_right():
    """Each example response is what the executor says is a valid proposal or a correct answer."""
    from executor import Executor
    from rewards import grade

    from rewards import distinct_inputs

    for k, shown in enumerate(prompts.PROPOSER_EXAMPLES):   # each of the proposers' worked examples
        for template in (prompts.propose_deduction, prompts.propose_abduction):
            proposal = parse_proposal(template([SEED_TRIPLET], k).examples[0][1])
            assert (proposal.program, proposal.input) == (shown.program, shown.input)
        inputs = parse_induction_proposal(prompts.propose_induction(SAMPLE, 10, k).examples[0][1], 10).inputs
        assert inputs == prompts.example_induction_inputs(10, k) and distinct_inputs(prompts.example_induction_inputs(12, k))
        assert prompts.reuses_example(shown.program, shown.input)
    example = prompts.SOLVER_EXAMPLE
    answers = [(task_type, task, parse_solution(task_type, chat.examples[0][1])) for task_type, task, chat in [
        (DEDUCTION, example, prompts.solve_deduction(SAMPLE)),
        (ABDUCTION, example, prompts.solve_abduction(SAMPLE)),
        (INDUCTION, prompts.SOLVER_EXAMPLE_INDUCTION, prompts.solve_induction(prompts.SOLVER_EXAMPLE_INDUCTION))]]
    with Executor(timeout_s=5.0, workers=1) as ex:
        for k, shown in enumerate(prompts.PROPOSER_EXAMPLES):
            runs = ex.validate_many([(shown.program, i) for i in prompts.example_induction_inputs(12, k)])
            assert [r.status for r in runs] == ["ok"] * len(runs)
        assert grade(ex, answers) == [1.0, 1.0, 1.0]
        pairs = prompts.SOLVER_EXAMPLE_INDUCTION.visible + prompts.SOLVER_EXAMPLE_INDUCTION.hidden
        assert [r.value for r in ex.validate_many([(example.program, i) for i, _ in pairs])] == [o for _, o in pairs]


def test_the_bare_value_answer_of_the_solver_examples_is_read_as_the_value():
    assert parse_solution(DEDUCTION, prompts.solve_deduction(SAMPLE).examples[0][1]) == "[4, 3, 2]"
    assert parse_solution(ABDUCTION, prompts.solve_abduction(SAMPLE).examples[0][1]) == "[4, 5, 6, 8], 2"


def test_proposer_rules_list_a_few_allowed_modules_only():
    from executor import ALLOWED_MODULES, BANNED_MODULES

    text = prompts.propose_deduction([SEED_TRIPLET]).user
    listed = text.split("it imports nothing, or only ")[1].split(". ")[0].split(", ")
    assert listed == list(prompts.PROMPT_MODULES)
    assert set(listed) <= set(ALLOWED_MODULES) and not set(listed) & set(BANNED_MODULES)


def test_python_prompts_prints_all_six_with_system_message_and_example_turns():
    out = subprocess.run([sys.executable, "prompts.py"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    for title in ["propose / deduction", "propose / abduction", "propose / induction", "solve / deduction", "solve / abduction", "solve / induction"]:
        assert title in out.stdout
    assert out.stdout.count(prompts.SYSTEM) == 6
    assert out.stdout.count("--- assistant ---") == 6 and out.stdout.count("--- user ---") == 12
    assert prompts.EXAMPLE_PROGRAM in out.stdout


# ------------------------------------------------------------------------------------------------
# parse_response


def test_response_with_and_without_the_prefill():
    assert parse_response("<think> a </think> <answer> b </answer>") == Response("a", "b")
    assert parse_response(" a </think> <answer> b </answer>") == Response("a", "b")  # prefill not glued on
    assert parse_response("<think></think><answer></answer>") == Response("", "")
    assert parse_response("<think>a</think><answer>b</answer> trailing ramble") == Response("a", "b")


def test_last_answer_wins_and_nesting():
    assert parse_response("<think>a</think><answer>1</answer><answer>2</answer>").answer == "2"
    assert parse_response("<think>x <answer>draft</answer> y</think><answer>final</answer>").answer == "final"
    assert parse_response("<think>a</think><answer>out <answer>in</answer></answer>").answer == "in"
    assert parse_response("<think><think>a</think><answer>b</answer>") == Response("a", "b")


def test_response_format_errors():
    for bad in [
        "",
        "no tags at all",
        "<think>a</think>",  # no answer
        "<think>a</think><answer>b",  # unclosed answer (cut off by the length limit)
        "<think>a<answer>b</answer>",  # think never closed
        "<answer>b</answer><think>a</think>",  # wrong order
        "<think>a</think><answer>b</answer><answer>c",  # last answer unclosed
        "</answer><answer></think>",
    ]:
        assert parse_response(bad) is None, bad


def test_an_answer_without_reasoning_is_spotted():
    assert thinks_empty(" </think>\n<answer>\n[]\n</answer>")            # the prefill, then nothing
    assert thinks_empty("<think> \n </think><answer>4</answer>")
    assert not thinks_empty(" f doubles it, so 4.\n</think>\n<answer>\n4\n</answer>")
    assert not thinks_empty("<answer>4</answer>")                          # a format error, not this


# ------------------------------------------------------------------------------------------------
# fenced blocks and the answer parsers


def test_fenced_blocks():
    text = "x ```python\ndef f(a):\n    return a\n``` y ```Input\n1, 2\n``` ```\nbare\n``` ```output 'inline'``` ```unclosed"
    assert fenced_blocks(text) == [
        ("python", "\ndef f(a):\n    return a\n"),
        ("input", "\n1, 2\n"),
        ("", "\nbare\n"),
        ("output", " 'inline'"),
    ]
    assert fenced_blocks("") == [] and fenced_blocks("``````") == [("", "")]


def test_parse_proposal():
    prog = "def f(a):\n    return a[::-1]"
    assert parse_proposal(respond(block("python", prog), block("input", "'abc'"))) == Proposal(prog, "'abc'")
    # an untagged, indented code block counts when no block is tagged python; the last input wins
    text = respond(block("", "  def f(a):\n      return 1"), block("input", "1"), block("input", "2"))
    assert parse_proposal(text) == Proposal("def f(a):\n    return 1", "2")
    # a tagged python block wins over an untagged one, in either order
    for blocks in [(block("python", prog), block("", "def f(a): return 0")),
                   (block("", "def f(a): return 0"), block("python", prog))]:
        assert parse_proposal(respond(*blocks, block("input", "1"))) == Proposal(prog, "1")
    # python and input blocks, then an untagged fence holding the expected output: not the program
    assert parse_proposal(respond(block("python", prog), block("input", "'abc'"), block("", "'cba'"))) == Proposal(prog, "'abc'")
    assert parse_proposal(respond(block("", "def f(a): return a"), block("input", "6"), block("", "6"))) == Proposal("def f(a): return a", "6")
    assert parse_proposal(respond(block("input", "6"), block("", "6"))) is None  # no block defines f
    # text around and between the blocks is ignored
    assert parse_proposal(respond("Here:", block("python", prog), "and", block("input", "1"), "done")) == Proposal(prog, "1")
    # blocks outside the answer do not count
    assert parse_proposal(respond(block("input", "1"), think=block("python", prog))) is None
    assert parse_proposal(respond(block("python", prog))) is None  # no input
    assert parse_proposal(respond(block("input", "1"))) is None  # no program
    assert parse_proposal(respond(block("python", prog), block("input", "  "))) is None  # empty input
    assert parse_proposal(block("python", prog) + block("input", "1")) is None  # no tags


def test_parse_induction_proposal():
    inputs = [block("input", str(i)) for i in range(12)]
    msg = block("message", "adds one")
    got = parse_induction_proposal(respond(*inputs, msg), n_inputs=10)
    assert got == InductionProposal(tuple(str(i) for i in range(2, 12)), "adds one")  # the last 10
    assert parse_induction_proposal(respond(*inputs[:9], msg), n_inputs=10) is None  # too few
    assert parse_induction_proposal(respond(*inputs), n_inputs=10) is None  # no message
    assert parse_induction_proposal(respond(*inputs[:3], msg), n_inputs=3).inputs == ("0", "1", "2")


def test_parse_solution():
    assert parse_solution(DEDUCTION, respond(block("output", "[3, 6]"))) == "[3, 6]"
    assert parse_solution(DEDUCTION, respond(block("", "[3, 6]"))) == "[3, 6]"  # untagged fence
    assert parse_solution(DEDUCTION, respond(block("python", "[3, 6]"))) == "[3, 6]"  # a value in a python fence
    assert parse_solution(DEDUCTION, " t </think><answer> 42 </answer>") == "42"  # bare answer
    assert parse_solution(DEDUCTION, " t </think><answer> 42 </answer> and then more text") == "42"
    assert parse_solution(DEDUCTION, respond(block("input", "1"))) is None  # fenced, but no output
    assert parse_solution(DEDUCTION, respond("")) is None  # empty answer
    assert parse_solution(DEDUCTION, respond(block("output", "  "))) is None  # empty block
    assert parse_solution(ABDUCTION, respond(block("input", "[1, 2], 3"))) == "[1, 2], 3"
    assert parse_solution(ABDUCTION, respond(block("output", "[3, 6]"))) is None
    prog = "def f(x):\n    return x"
    assert parse_solution(INDUCTION, respond(block("python", prog))) == prog
    assert parse_solution(INDUCTION, respond(block("", prog))) == prog  # untagged, none tagged
    assert parse_solution(INDUCTION, respond("def f(x): return x")) is None  # code must be fenced
    assert parse_solution(INDUCTION, respond(block("python", "\n  \n"))) is None
    assert parse_solution("nonsense", respond(block("output", "1"))) is None


def test_a_tagged_block_is_never_overridden_by_an_untagged_one():
    for after in ("because 1 + 2", "f(1, 2) == 3", "3"):
        assert parse_solution(DEDUCTION, respond(block("output", "3"), block("", after))) == "3"
        assert parse_solution(DEDUCTION, respond(block("", after), block("output", "3"))) == "3"
        assert parse_solution(ABDUCTION, respond(block("input", "1, 2"), block("", after))) == "1, 2"
    prog = "def f(x):\n    return x"
    assert parse_solution(INDUCTION, respond(block("python", prog), block("", "f(2)"))) == prog
    assert parse_solution(INDUCTION, respond(block("py", prog), block("", "def f(x): return 0"))) == prog


def test_plainly_stated_answers_count_only_as_the_whole_answer():
    stated = {
        DEDUCTION: ["The output is 3.", "the output is 3", "THE OUTPUT IS 3", "<output>3</output>",
                    "# Output: 3", "# output:3"],
        ABDUCTION: ["The input is 3.", "<input>3</input>", "# Input: 3"],
    }
    for task_type, answers in stated.items():
        for answer in answers:
            assert parse_solution(task_type, respond(answer)) == "3", (task_type, answer)
    assert parse_solution(DEDUCTION, respond("The output is [1, 'a.'].")) == "[1, 'a.']"
    assert parse_solution(ABDUCTION, respond("The input is [1, 2], 'x'.")) == "[1, 2], 'x'"
    # anchored: anything else is read as the answer itself, as before (and graded wrong)
    for answer in ("So the output is 3.", "output(1)", "The output is", "<output></output>", "3 # Output: 3"):
        assert parse_solution(DEDUCTION, respond(answer)) == answer, answer
    assert parse_solution(ABDUCTION, respond("The output is 3")) == "The output is 3"  # the other kind
    assert parse_solution(DEDUCTION, respond("The input is 3")) == "The input is 3"
    # a fenced answer is read from its blocks only
    assert parse_solution(DEDUCTION, respond("The output is 3.", block("output", "4"))) == "4"


# ------------------------------------------------------------------------------------------------
# Robustness: never raise, linear time

PARSERS = [
    parse_response,
    fenced_blocks,
    parse_proposal,
    parse_induction_proposal,
    lambda s: parse_solution(DEDUCTION, s),
    lambda s: parse_solution(ABDUCTION, s),
    lambda s: parse_solution(INDUCTION, s),
]
PIECES = ["<think>", "</think>", "<answer>", "</answer>", "```", "```python\n", "```input\n", "```output\n", "```message\n", "\n", " ", "def f(a):\n    return a", "1, 2", "é", "\x00", "\ud800"]


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_parsers_never_raise_on_random_unicode(text):
    for parse in PARSERS:
        parse(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from(PIECES) | st.text(max_size=5), max_size=40).map("".join))
def test_parsers_never_raise_on_tag_soup(text):
    for parse in PARSERS:
        parse(text)


def test_parsers_are_fast_on_megabytes():
    huge = [
        "<answer>" * 200_000,
        "</think>" * 200_000 + "<answer>" + "```input\n" * 100_000 + "</answer>",
        "<think>" + "x" * 3_000_000 + "</think><answer>" + "```" * 300_000 + "</answer>",
        "</think><answer>" + "```" + "a" * 2_000_000 + "</answer>",
        "<think>" * 100_000 + "</think>" * 100_000 + "<answer>" * 100_000 + "</answer>" * 100_000,
    ]
    start = time.perf_counter()
    for text in huge:
        for parse in PARSERS:
            parse(text)
    assert time.perf_counter() - start < 30.0   # quadratic work on these inputs would take hours


def test_no_seeding_request_repeats_its_worked_example():
    """During seeding the buffers hold the seed triplet alone: a request identical to the example's
    would invite the example's answer back."""
    for chat in (prompts.propose_deduction([SEED_TRIPLET]), prompts.propose_abduction([SEED_TRIPLET]),
                 prompts.propose_induction(SEED_TRIPLET, 6)):
        assert chat.user != chat.examples[0][0]


def test_reuse_of_the_worked_example_is_seen_through_its_marks():
    assert prompts.reuses_example("def f(words, n):\n    return len(words) * n", "['kiwi'], 2")
    assert prompts.reuses_example("def f(a):\n    return a", '["apple", "fig"]')   # either quote
    assert not prompts.reuses_example("def f(items, k):\n    return items[:k]", "['fig'], 1")


def test_the_abduction_solvers_instructions_hold_no_value_to_copy():
    """After an empty <think>, the literal of the instructions became the trained solver's default guess."""
    request = prompts.solve_abduction(SAMPLE).user.replace(SAMPLE.program, "").replace(SAMPLE.output, "")
    assert prompts.CALL_RULE in request and prompts.ARGS_RULE not in request
    assert not any(ch.isdigit() or ch in "'[]`" for ch in prompts.CALL_RULE)
