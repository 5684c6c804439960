"""rewards.py: Eq. 4-6 and the TRR++ advantages (Eq. 8) with hand-computed numbers, and the grading
of every task type through the real executor."""

import math

import pytest
import torch

from executor import Executor
from prompts import (
    ABDUCTION,
    DEDUCTION,
    INDUCTION,
    PROPOSE,
    SOLVE,
    TASK_TYPES,
    InductionProposal,
    InductionTask,
    Proposal,
    Triplet,
)
from rewards import (
    OFFICIAL,
    PAPER,
    check_induction_proposals,
    check_proposals,
    composite_reward,
    distinct_inputs,
    grade,
    is_copy,
    normalized,
    r_propose,
    trr_advantages,
)

# ------------------------------------------------------------------------------------------------
# Eq. 4


@pytest.mark.parametrize(
    "solve_rewards, expected",
    [
        ([0] * 8, 0.0),  # rbar = 0: impossible, no reward
        ([1] * 8, 0.0),  # rbar = 1: trivial, no reward
        ([1] + [0] * 7, 7 / 8),  # rbar = 1/n: the hardest solvable task earns the most
        ([1] * 7 + [0], 1 / 8),  # rbar = (n-1)/n
        ([1, 0, 1, 0], 0.5),
        ([1.0, 0.0, 0.0], 2 / 3),
        ([1], 0.0),
        ([0], 0.0),
    ],
)
def test_r_propose(solve_rewards, expected):
    assert r_propose(solve_rewards) == pytest.approx(expected)


def test_r_propose_needs_rollouts():
    with pytest.raises(ValueError):
        r_propose([])


# ------------------------------------------------------------------------------------------------
# Eq. 6


def test_composite_reward_solver():
    for rule in (PAPER, OFFICIAL):  # the rule only concerns the proposer
        assert composite_reward(SOLVE, True, 1.0, rule) == 1.0  # correct
        assert composite_reward(SOLVE, True, 0.0, rule) == -0.5  # well formatted, wrong
        assert composite_reward(SOLVE, False, 0.0, rule) == -1.0  # format error


def test_composite_reward_proposer_paper_rule_is_the_default():
    assert composite_reward(PROPOSE, True, 7 / 8) == 7 / 8
    assert composite_reward(PROPOSE, True, 0.0) == 0.0  # valid but trivial / impossible
    assert composite_reward(PROPOSE, False, 0.0) == -1.0  # invalid task or format error
    assert composite_reward(PROPOSE, True, r_propose([1] * 8), rule=PAPER) == 0.0


def test_composite_reward_proposer_official_rule():
    assert composite_reward(PROPOSE, True, 7 / 8, rule=OFFICIAL) == 7 / 8
    assert composite_reward(PROPOSE, True, r_propose([0] * 8), rule=OFFICIAL) == -0.5
    assert composite_reward(PROPOSE, True, r_propose([1] * 8), rule=OFFICIAL) == -0.5
    assert composite_reward(PROPOSE, False, 0.0, rule=OFFICIAL) == -1.0


def test_composite_reward_rejects_unknown_names():
    with pytest.raises(ValueError):
        composite_reward("judge", True, 1.0)
    with pytest.raises(ValueError):
        composite_reward(SOLVE, True, 1.0, rule="mine")


# ------------------------------------------------------------------------------------------------
# Eq. 8


def test_trr_advantages_hand_computed():
    # group (deduction, solve): r = 1, 0, 0, 1 -> mu = 0.5, sigma = sqrt(4 * 0.25 / 3) = 0.57735
    # group (abduction, propose): r = 1, -0.5, -1 -> mu = -1/6,
    #   sigma = sqrt((7/6)^2 + (1/3)^2 + (5/6)^2) / 2) = sqrt(13/12) = 1.040833
    samples = [
        (DEDUCTION, SOLVE, 1.0),
        (ABDUCTION, PROPOSE, 1.0),
        (DEDUCTION, SOLVE, 0.0),
        (ABDUCTION, PROPOSE, -0.5),
        (DEDUCTION, SOLVE, 0.0),
        (ABDUCTION, PROPOSE, -1.0),
        (DEDUCTION, SOLVE, 1.0),
    ]
    a = 0.5 / math.sqrt(1 / 3)
    s = math.sqrt(13 / 12)
    expected = [a, (7 / 6) / s, -a, (-1 / 3) / s, -a, (-5 / 6) / s, a]
    assert trr_advantages(samples) == pytest.approx(expected, rel=1e-5)


def test_trr_advantages_zero_for_single_or_constant_groups():
    samples = [(INDUCTION, SOLVE, 1.0), (DEDUCTION, PROPOSE, 0.3), (DEDUCTION, PROPOSE, 0.3), (DEDUCTION, PROPOSE, 0.3)]
    assert trr_advantages(samples) == [0.0, 0.0, 0.0, 0.0]
    assert trr_advantages([]) == []


def test_trr_advantages_match_torch_std_per_group():
    g = torch.Generator().manual_seed(0)
    samples = []
    for t in TASK_TYPES:
        for role in (PROPOSE, SOLVE):
            samples += [(t, role, float(r)) for r in torch.randint(-2, 3, (9,), generator=g) / 2]
    got = torch.tensor(trr_advantages(samples))
    for t in TASK_TYPES:
        for role in (PROPOSE, SOLVE):
            idx = [k for k, (tt, rr, _) in enumerate(samples) if (tt, rr) == (t, role)]
            r = torch.tensor([samples[k][2] for k in idx])
            ref = (r - r.mean()) / (r.std() + 1e-6)  # torch.std: sample std (n - 1)
            assert torch.allclose(got[idx], ref, atol=1e-6)


def test_six_baselines_are_separate():
    groups = [(t, role) for t in TASK_TYPES for role in (PROPOSE, SOLVE)]
    base = [(t, role, float(k % 3)) for k in range(5) for t, role in groups]  # interleaved
    before = trr_advantages(base)
    for changed in groups:
        moved = [(t, role, r * 10 + 7 if (t, role) == changed else r) for t, role, r in base]
        after = trr_advantages(moved)
        for k, (t, role, _) in enumerate(base):
            if (t, role) != changed:
                assert after[k] == before[k]  # exactly: other groups do not move


def test_trr_advantages_reject_unknown_groups():
    with pytest.raises(ValueError):
        trr_advantages([("deduction", "judge", 1.0)])
    with pytest.raises(ValueError):
        trr_advantages([("Deduction", SOLVE, 1.0)])


# ------------------------------------------------------------------------------------------------
# Eq. 5 and proposal validation, through the real executor


@pytest.fixture(scope="module")
def executor():
    with Executor(timeout_s=2.0) as ex:
        yield ex


class CountingExecutor:
    """The real executor, counting the batched calls."""

    def __init__(self, inner):
        self.inner, self.run_many_calls, self.jobs = inner, 0, 0

    def run_many(self, jobs):
        self.run_many_calls += 1
        self.jobs += len(jobs)
        return self.inner.run_many(jobs)


SORT_PAIRS = Triplet("def f(xs):\n    return sorted(xs)[:2]", "[5, 3, 9]", "[3, 5]")
ABS_SUM = Triplet("def f(a, b):\n    return abs(a) + abs(b)", "-2, 3", "5")


def test_grade_deduction(executor):
    items = [
        (DEDUCTION, SORT_PAIRS, "[3, 5]"),
        (DEDUCTION, SORT_PAIRS, "[3,5]"),  # the same value written differently
        (DEDUCTION, SORT_PAIRS, "[5, 3]"),
        (DEDUCTION, SORT_PAIRS, "(3, 5)"),  # a tuple is not a list
        (DEDUCTION, SORT_PAIRS, "[3, 5"),  # malformed
        (DEDUCTION, SORT_PAIRS, "sorted([5, 3])"),  # an expression, never evaluated
        (DEDUCTION, SORT_PAIRS, "x" * 200_000),  # huge
        (DEDUCTION, SORT_PAIRS, None),  # format error
        (DEDUCTION, Triplet("def f(x):\n    return float(x)", "'nan'", "nan"), "nan"),
    ]
    assert grade(executor, items) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0]


def test_grade_abduction_accepts_any_input_that_works(executor):
    items = [
        (ABDUCTION, ABS_SUM, "-2, 3"),  # the proposer's own input
        (ABDUCTION, ABS_SUM, "5, 0"),  # a different input with the same output: still correct
        (ABDUCTION, ABS_SUM, "1, 1"),  # wrong output
        (ABDUCTION, ABS_SUM, "1, "),  # missing argument: an error in f
        (ABDUCTION, ABS_SUM, "(1, 2"),  # malformed text
        (ABDUCTION, ABS_SUM, "__import__('os').getpid(), 0"),  # rejected by the executor
        (ABDUCTION, ABS_SUM, ""),  # no arguments
        (ABDUCTION, ABS_SUM, None),
    ]
    assert grade(executor, items) == [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_grade_induction_uses_the_hidden_pairs(executor):
    task = InductionTask(
        program="def f(x):\n    return x * x",
        message="squares a number",
        visible=(("2", "4"), ("0", "0"), ("1", "1")),
        hidden=(("3", "9"), ("-4", "16")),
    )
    right = "def f(x):\n    return x ** 2"
    fits_visible_only = "def f(x):\n    return 2 * x if x == 2 else x"  # 2->4, 0->0, 1->1, but 3->3
    half_right = "def f(x):\n    return x * x if x > 0 else x"  # 3->9 but -4->-4
    items = [
        (INDUCTION, task, right),
        (INDUCTION, task, fits_visible_only),
        (INDUCTION, task, half_right),
        (INDUCTION, task, "def f(x):\n    return 1 / 0"),
        (INDUCTION, task, "def g(x):\n    return x * x"),  # no f
        (INDUCTION, task, "def f(x) return x"),  # syntax error
        (INDUCTION, task, "import os\ndef f(x):\n    return x * x"),  # rejected
        (INDUCTION, task, None),
    ]
    assert grade(executor, items) == [1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]


def test_grade_is_one_batched_executor_call(executor):
    task = InductionTask("def f(x):\n    return -x", "negates", (("1", "-1"),), (("2", "-2"), ("5", "-5")))
    items = [
        (DEDUCTION, SORT_PAIRS, "[3, 5]"),
        (ABDUCTION, ABS_SUM, "5, 0"),
        (ABDUCTION, ABS_SUM, "5, 0"),  # identical answers run once
        (INDUCTION, task, "def f(x):\n    return -x"),
        (INDUCTION, task, "def f(x):\n    return -x"),
        (ABDUCTION, ABS_SUM, "9, 9"),
    ]
    counting = CountingExecutor(executor)
    assert grade(counting, items) == [1.0, 1.0, 1.0, 1.0, 1.0, 0.0]
    assert counting.run_many_calls == 1 and counting.jobs == 1 + 2 + 1  # deduction needs no run
    assert grade(CountingExecutor(executor), []) == []


def test_check_proposals(executor):
    proposals = [
        Proposal("def f(s):\n    return s[::-1]", "'abc'"),
        None,  # format error
        Proposal("def f(x):\n    return x / 0", "1"),  # raises
        Proposal("import random\ndef f(x):\n    return random.random()", "1"),  # forbidden
        Proposal("def f(x):\n    return list({str(i) for i in range(x)})", "20"),  # hash order
        Proposal("def f(x):\n    while True:\n        pass", "1"),  # never returns
    ]
    tasks = check_proposals(executor, proposals)
    assert tasks == [Triplet("def f(s):\n    return s[::-1]", "'abc'", "'cba'"), None, None, None, None, None]
    assert check_proposals(executor, []) == [] and check_proposals(executor, [None]) == [None]


def test_check_induction_proposals_split_and_reject(executor):
    program = "def f(a, b):\n    return a * b"
    good = InductionProposal(tuple(f"{k}, {k + 1}" for k in range(10)), "multiplies")
    bad = InductionProposal(("1, 2", "3, 'x'", "'a', 'b'", "4, 5"), "multiplies")  # 'a' * 'b' raises
    tasks = check_induction_proposals(executor, [program, program, program], [good, None, bad])
    pairs = tuple((f"{k}, {k + 1}", str(k * (k + 1))) for k in range(10))
    assert tasks[0] == InductionTask(program, "multiplies", visible=pairs[:5], hidden=pairs[5:])
    assert tasks[1] is None and tasks[2] is None
    odd = check_induction_proposals(executor, [program], [InductionProposal(("1, 1", "2, 2", "3, 3"), "m")])[0]
    assert len(odd.visible) == 1 and len(odd.hidden) == 2
    with pytest.raises(ValueError):
        check_induction_proposals(executor, [program], [])


def test_induction_inputs_must_be_distinct(executor):
    program = "def f(a):\n    return a"
    repeated = [("1", "2", "3", "1"), ("[1, 2]", "[1,2]", "3", "4"), ("1", "True", "2", "3"), ("'a'", '"a"', "1", "2")]
    for inputs in repeated:  # the same call twice: a hidden pair would also be visible
        assert not distinct_inputs(inputs)
        assert check_induction_proposals(executor, [program], [InductionProposal(inputs, "m")]) == [None]
    assert distinct_inputs(("1", "2", "'1'", "[1]", "(1,)"))


def test_copies_match_up_to_whitespace():
    known = {normalized("def f(a):\n    return a")}
    assert is_copy(Proposal("def f(a):\n        return a\n", "'other input'"), known)  # same program, any input
    assert is_copy(Proposal("def  f(a): \n\treturn a", "1"), known)
    assert not is_copy(Proposal("def f(a):\n    return a + 1", "1"), known)
    seen_inputs = {frozenset({"1", "2", "[1, 2]"})}
    assert is_copy(InductionProposal(("[1,  2]", "2", "1"), "m"), seen_inputs)  # the same inputs, reordered
    assert not is_copy(InductionProposal(("1", "2", "3"), "m"), seen_inputs)
    assert not is_copy(None, known)
