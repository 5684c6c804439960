"""How each response is scored: the rewards of Eq. 4-6 and the TRR++ advantages of Eq. 8.

In the paper (Zhao et al. 2025, Sec. 3.1 and 3.3.5):

    Eq. 4  learnability of a proposed task, from n solver rollouts on it (official n = 8):
               rbar = (1/n) sum_j r_solve_j
               r_propose = 0          if rbar == 0 or rbar == 1   (impossible or trivial)
                         = 1 - rbar   otherwise
    Eq. 5  r_solve = 1 if the solver's answer is correct, else 0, checked by the executor:
               deduction  predicted o   == gold o            (value equality, same_value)
               abduction  p(predicted i) == gold o            (any input that works scores 1)
               induction  predicted p(i) == gold o for every hidden pair (all must match)
    Eq. 6  format-aware composite reward of one response y:
               R(y) = r_role  if y is passable
                    = -0.5    if y is well formatted but wrong
                    = -1      if y has a format error
    Eq. 8  Task-Relative REINFORCE++: one baseline per (task type, role), six in all:
               A = (r - mu_{type,role}) / (sigma_{type,role} + eps)

Proposal validation also lives here, because it decides the proposer's term of Eq. 6: a proposal
becomes a task only if the executor's `validate` (integrity, safety, determinism) says "ok"; an
invalid proposal counts as a format error, as in the official code.

Where we depart, and which rule is used:
- Eq. 6 for the proposer has two readings. PAPER (the default): a valid task is passable, so it
  earns r_propose, which is 0 for a task the solver always or never solves. OFFICIAL (the authors'
  code): a valid task with r_propose = 0 earns -0.5, like a wrong answer. Pick with `rule=`.
- Eq. 8: the official code puts the reward on the last token and whitens over all response tokens
  of a group (so long responses weigh more in mu and sigma); we use one reward per response, the
  readable sequence-level equivalent. sigma is the sample standard deviation (Bessel-corrected,
  divide by n - 1), like torch.std's default and verl's masked whitening; eps = 1e-6. A group
  with one response or with all rewards equal gets A = 0 (nothing to compare against).
- Copies are not tasks (not in the paper): a deduction/abduction proposal whose program repeats,
  up to whitespace, a program of the prompt's worked example (prompts.EXAMPLE_PROGRAMS) or one
  already in its buffer (its K references are drawn from there), or an induction proposal whose
  inputs repeat the worked example's or those of a buffer task for the same program, does not
  enter the buffer and earns the invalid-proposal reward (-1). Without
  this, a small model farms Eq. 4 by handing back what it was shown. Induction inputs must also be
  distinct values: a repeated input would put a hidden pair in the visible half.
- Answers are never evaluated in this process: programs and inputs run in the executor's sandbox
  (which also caps their size); a predicted output is compared with the gold one by the
  executor's `same_value` (a restricted literal parser with a size cap, NaN == NaN; text that is
  not a literal is never equal).
"""

from __future__ import annotations

import math
from typing import Sequence

from executor import same_value
from prompts import (
    ABDUCTION,
    DEDUCTION,
    EXAMPLE_PROGRAMS,
    INDUCTION,
    PROPOSE,
    PROPOSER_EXAMPLES,
    ROLES,
    TASK_TYPES,
    InductionProposal,
    InductionTask,
    Proposal,
    Triplet,
    example_induction_inputs,
)

PAPER, OFFICIAL = "paper", "official"  # the two readings of Eq. 6 for the proposer
WRONG = -0.5  # Eq. 6: well formatted but wrong
FORMAT_ERROR = -1.0  # Eq. 6: format error (for the proposer: also an invalid task)


# ------------------------------------------------------------------------------------------------
# Eq. 4: the proposer's learnability reward


def r_propose(solve_rewards: Sequence[float]) -> float:
    """Eq. 4: 1 - rbar for a task the solver sometimes solves, 0 if it always or never does.

    `solve_rewards` are the Eq. 5 values (0 or 1) of the n solver rollouts on the task.
    """
    if len(solve_rewards) == 0:
        raise ValueError("r_propose needs at least one solver rollout")
    rbar = sum(solve_rewards) / len(solve_rewards)
    return 0.0 if rbar in (0.0, 1.0) else 1.0 - rbar


# ------------------------------------------------------------------------------------------------
# Eq. 5: grading the solver through the executor


def grade(executor, items: Sequence[tuple[str, Triplet | InductionTask, str | None]]) -> list[float]:
    """Eq. 5 for a batch: r_solve (0 or 1) of each (task_type, task, answer).

    `answer` is what prompts.parse_solution returned: the predicted output (deduction), input
    (abduction) or program (induction), or None for a format error (scores 0). Every program run
    of the batch goes to the executor in ONE run_many call; identical (program, input) jobs, common
    among n rollouts of one task, run once.
    """
    scores = [0.0] * len(items)
    needs: list[tuple[int, tuple[str, str], str]] = []  # (item index, (program, input), gold output)
    for k, (task_type, task, answer) in enumerate(items):
        if task_type not in TASK_TYPES:
            raise ValueError(f"unknown task type {task_type!r}")
        if answer is None:
            continue  # format error: 0
        if task_type == DEDUCTION:  # o' == o
            scores[k] = float(same_value(answer, task.output))
            continue
        scores[k] = 1.0  # correct unless one of its runs below fails
        if task_type == ABDUCTION:  # p(i') == o
            needs.append((k, (task.program, answer), task.output))
        elif task_type == INDUCTION:  # p'(i) == o for every hidden (i, o)
            needs += [(k, (answer, i), o) for i, o in task.hidden]

    jobs = list(dict.fromkeys(job for _, job, _ in needs))  # unique, in order
    results = dict(zip(jobs, executor.run_many(jobs))) if jobs else {}
    for k, job, gold in needs:
        result = results[job]
        if result.status != "ok" or not same_value(result.value, gold):
            scores[k] = 0.0  # one failed run makes the whole answer wrong
    return scores


# ------------------------------------------------------------------------------------------------
# Eq. 6: the format-aware composite reward


def composite_reward(role: str, passable: bool, r_role: float, rule: str = PAPER) -> float:
    """Eq. 6: the reward of one response.

    passable is the paper's word: the response can be graded at all.
    solver:   passable = the answer parsed; r_role = r_solve. Correct -> 1, wrong -> -0.5.
    proposer: passable = the answer parsed AND the task is valid; r_role = r_propose (Eq. 4).
              PAPER:    R = r_propose (0 for a trivial or impossible task).
              OFFICIAL: R = r_propose if it is > 0, else -0.5 (the authors' code).
    Not passable (a format error, or an invalid task) -> -1 under both rules.
    """
    if role not in ROLES or rule not in (PAPER, OFFICIAL):
        raise ValueError(f"unknown role {role!r} or rule {rule!r}")
    if not passable:
        return FORMAT_ERROR
    if role == PROPOSE and rule == PAPER:
        return r_role
    return r_role if r_role > 0 else WRONG


# ------------------------------------------------------------------------------------------------
# Copies: a proposal that repeats what its proposer was shown is not a new task


def normalized(text: str) -> str:
    """Every run of whitespace made one space, so that copies differing only in layout match."""
    return " ".join(text.split())


def is_copy(proposal: Proposal | InductionProposal | None, known: set) -> bool:
    """Whether a parsed proposal repeats a known one. `known` holds normalized programs (deduction,
    abduction) or frozensets of normalized inputs (induction, for the same program)."""
    if isinstance(proposal, Proposal):
        return normalized(proposal.program) in known
    if isinstance(proposal, InductionProposal):
        return frozenset(map(normalized, proposal.inputs)) in known
    return False


def known_proposals(buffers: dict[str, list], task_type: str, program: str | None, n_inputs: int) -> set:
    """What a proposal must not repeat (is_copy). Deduction/abduction: the worked examples'
    programs and the buffer's. Induction (for `program`): the worked examples' inputs and the input
    sets of buffer tasks on the same program."""
    if task_type == INDUCTION:
        return {frozenset(map(normalized, example_induction_inputs(n_inputs, k)))
                for k in range(len(PROPOSER_EXAMPLES))} | {
            frozenset(normalized(i) for i, _ in task.visible + task.hidden)
            for task in buffers[INDUCTION] if task.program == program}
    shown = list(EXAMPLE_PROGRAMS) + [task.program for task in buffers[task_type]]
    return {normalized(text) for text in shown}


def distinct_inputs(inputs: Sequence[str]) -> bool:
    """No two inputs denote the same call: equal as values (same_value), or as text up to whitespace."""
    for a in range(len(inputs)):
        for b in range(a):
            if normalized(inputs[a]) == normalized(inputs[b]) or same_value(inputs[a], inputs[b]):
                return False
    return True


# ------------------------------------------------------------------------------------------------
# Proposal validation: which proposals become tasks


def check_proposals(executor, proposals: Sequence[Proposal | None]) -> list[Triplet | None]:
    """Deduction / abduction proposals -> validated triplets (None: format error or invalid).

    One validate_many call: integrity, safety and determinism; the output is the executor's.
    """
    todo = [(k, p) for k, p in enumerate(proposals) if p is not None]
    results = executor.validate_many([(p.program, p.input) for _, p in todo]) if todo else []
    tasks: list[Triplet | None] = [None] * len(proposals)
    for (k, p), result in zip(todo, results):
        if result.status == "ok":
            tasks[k] = Triplet(p.program, p.input, result.value)
    return tasks


def check_induction_proposals(
    executor, programs: Sequence[str], proposals: Sequence[InductionProposal | None]
) -> list[InductionTask | None]:
    """Induction proposals (inputs + message for programs[k]) -> tasks (None: format error or invalid).

    Kept only if the inputs are distinct and every one validates (runs, safe, deterministic). The
    first half of the pairs is shown to the solver, the rest hidden for grading (N = 6: 3 and 3).
    One validate_many call.
    """
    if len(programs) != len(proposals):
        raise ValueError("one program per induction proposal")
    todo = [(k, p) for k, p in enumerate(proposals)
            if p is not None and len(p.inputs) >= 2 and distinct_inputs(p.inputs)]
    jobs = [(programs[k], i) for k, p in todo for i in p.inputs]
    results = iter(executor.validate_many(jobs) if jobs else [])
    tasks: list[InductionTask | None] = [None] * len(proposals)
    for k, p in todo:
        runs = [next(results) for _ in p.inputs]
        if all(r.status == "ok" for r in runs):
            pairs = tuple((i, r.value) for i, r in zip(p.inputs, runs))
            half = len(pairs) // 2
            tasks[k] = InductionTask(programs[k], p.message, visible=pairs[:half], hidden=pairs[half:])
    return tasks


# ------------------------------------------------------------------------------------------------
# Eq. 8: Task-Relative REINFORCE++ advantages


def trr_advantages(samples: Sequence[tuple[str, str, float]], eps: float = 1e-6) -> list[float]:
    """Eq. 8: A = (r - mu) / (sigma + eps), mu and sigma over the same (task type, role) group.

    `samples` are (task_type, role, reward) for every response of the step (reward = Eq. 6);
    the advantages come back in the same order. sigma is the sample std (divide by n - 1).
    """
    groups: dict[tuple[str, str], list[int]] = {}  # (task type, role) -> indices into samples
    for k, (task_type, role, _) in enumerate(samples):
        if task_type not in TASK_TYPES or role not in ROLES:
            raise ValueError(f"unknown group ({task_type!r}, {role!r})")
        groups.setdefault((task_type, role), []).append(k)

    advantages = [0.0] * len(samples)
    for members in groups.values():
        r = [float(samples[k][2]) for k in members]
        n = len(r)
        if n < 2 or max(r) == min(r):
            continue  # one response, or all equal: no signal, A = 0
        mu = sum(r) / n
        sigma = math.sqrt(sum((x - mu) ** 2 for x in r) / (n - 1))
        for k, x in zip(members, r):
            advantages[k] = (x - mu) / (sigma + eps)
    return advantages

