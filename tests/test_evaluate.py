"""evaluate.py: every benchmark's loader and grader, scripted answers that are all right (100%), all
wrong (0%) or unreadable (format errors), the tiny model end to end, the report, and determinism."""

import gzip
import json
from dataclasses import asdict

import pytest
import torch

import azr_mini
from run import latest_checkpoint
import evaluate as ev
from executor import Executor
from policy import Completion
from prompts import ABDUCTION, DEDUCTION, INDUCTION, InductionTask, Triplet
from scripted import HalfScripted, TINY_FLAGS, answer, run_tiny

CRUX = [{"code": "def f(x):\n    return x + 1", "input": "1", "output": "2", "id": "a"},
        {"code": "def f(s):\n    return s[::-1]", "input": "'ab'", "output": "'ba'", "id": "b"},
        {"code": "def f(a, b):\n    return a * b", "input": "3, 4", "output": "12", "id": "c"}]
GSM = [{"question": "Tom has 3 apples and buys 4 more. How many?", "answer": "3 + 4 = 7\n#### 7"},
       {"question": "A pen costs $1,200 a box; two boxes?", "answer": "2 * 1200 = 2400\n#### 2,400"}]
INDUCTION_TASK = InductionTask("def f(a):\n    return a * 3", "Triples its argument.", (("1", "3"), ("2", "6")),
                               (("5", "15"), ("0", "0")))


@pytest.fixture(scope="module")
def executor():
    with Executor(timeout_s=5) as ex:
        yield ex


@pytest.fixture(scope="module")
def tiny(one_thread):
    return azr_mini.build_policy(azr_mini.Config(model="tiny"))


@pytest.fixture()
def files(tmp_path):
    """One small file per benchmark (HumanEval: the package's own data)."""
    crux, gsm, selfplay = tmp_path / "crux.jsonl", tmp_path / "gsm.jsonl", tmp_path / "selfplay.jsonl"
    crux.write_text("".join(json.dumps(d) + "\n" for d in CRUX))
    gsm.write_text("".join(json.dumps(d) + "\n" for d in GSM))
    tasks = [(DEDUCTION, Triplet(**{k: CRUX[0][k] for k in ("input", "output")}, program=CRUX[0]["code"])),
             (ABDUCTION, Triplet(CRUX[2]["code"], CRUX[2]["input"], CRUX[2]["output"])),
             (INDUCTION, INDUCTION_TASK)]
    selfplay.write_text("".join(json.dumps({"task_type": t, "task": asdict(task)}) + "\n"
                                for t, task in tasks))
    return {"cruxeval-o": crux, "cruxeval-i": crux, "gsm8k": gsm, "selfplay": selfplay, "humaneval": None}


def right_answer(item: ev.Item) -> str:
    """A well-formed, correct response to an item."""
    if item.kind == DEDUCTION:
        return answer(("output", item.task.output))
    if item.kind == ABDUCTION:
        return answer(("input", item.task.input))
    if item.kind == INDUCTION:
        return answer(("python", item.task.program))
    if item.kind == ev.HUMANEVAL:
        return answer(("python", item.task["prompt"] + item.task["canonical_solution"]))
    return f"so the answer is {item.task}\n</think>\n<answer>\n{item.task}\n</answer>"   # GSM8K: the bare number


def wrong_answer(item: ev.Item) -> str:
    """Well formed and wrong."""
    if item.kind in (DEDUCTION, ev.GSM8K):
        return answer(("output", "-987654"))
    if item.kind == ABDUCTION:
        return answer(("input", "'no such input', 0, 0, 0, 0"))
    return answer(("python", "def f(*args):\n    return -987654"))


class Scripted:
    """The tiny policy, but each prompt gets the response `respond(item)` (tokenized for real)."""

    def __init__(self, policy, items, respond):
        self.policy = policy
        self.by_prompt = {policy.format_chat(i.prompt.messages(), prefill="<think>"): respond(i) for i in items}

    def __getattr__(self, name):
        return getattr(self.policy, name)

    def generate(self, prompts, **kwargs):
        return [Completion(self.policy.encode(p), self.policy.encode(self.by_prompt[p]), self.by_prompt[p], False)
                for p in prompts]


def load(bench, files, limit=None):
    return ev.load_bench(bench, str(files[bench]) if files[bench] else None, limit)


# --------------------------------------------------------------------------------------------------
# Loaders


def test_each_loader_reads_its_file_with_the_right_prompts_and_kinds(files):
    crux_o, crux_i = load("cruxeval-o", files), load("cruxeval-i", files)
    assert [i.id for i in crux_o] == ["a", "b", "c"] and {i.kind for i in crux_o} == {DEDUCTION}
    assert {i.kind for i in crux_i} == {ABDUCTION}
    assert "What does this Python function return" in crux_o[0].prompt.user and "```input\n1\n```" in crux_o[0].prompt.user
    assert "Find an input" in crux_i[0].prompt.user and "```output\n2\n```" in crux_i[0].prompt.user
    gsm = load("gsm8k", files)
    assert [i.task for i in gsm] == ["7", "2400"] and "Tom has 3 apples" in gsm[0].prompt.user
    selfplay = load("selfplay", files)
    assert [i.kind for i in selfplay] == [DEDUCTION, ABDUCTION, INDUCTION] and selfplay[2].task == INDUCTION_TASK
    human = load("humaneval", files, limit=3)
    assert [i.id for i in human] == ["HumanEval/0", "HumanEval/1", "HumanEval/2"]
    assert "def has_close_elements" in human[0].prompt.user and human[0].prompt.system
    assert len(load("cruxeval-o", files, limit=2)) == 2


def test_the_shipped_selfplay_set_loads_and_mixes_the_three_types():
    items = ev.load_bench("selfplay", None, None)
    kinds = [i.kind for i in items]
    assert len(items) >= 30 and all(kinds.count(t) >= 10 for t in (DEDUCTION, ABDUCTION, INDUCTION))
    assert kinds[:3] == [DEDUCTION, ABDUCTION, INDUCTION]      # interleaved: --limit keeps the mix
    assert len({(i.kind, i.task) for i in items}) == len(items)


def test_a_missing_or_broken_file_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="no such file.*CRUXEval"):
        ev.load_bench("cruxeval-o", str(tmp_path / "nope.jsonl"), None)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"code": "def f(x): return x"}\n')
    with pytest.raises(SystemExit, match="line 1: no field input, output"):
        ev.load_bench("cruxeval-o", str(bad), None)
    bad.write_text("not json\n")
    with pytest.raises(SystemExit, match="line 1: not JSON"):
        ev.load_bench("gsm8k", str(bad), None)
    bad.write_text(json.dumps({"task_type": "riddles", "task": {}}) + "\n")
    with pytest.raises(SystemExit, match="unknown task_type"):
        ev.load_bench("selfplay", str(bad), None)


def test_humaneval_canonical_solutions_pass_in_our_executor_except_the_listed_ones(executor):
    rows = [json.loads(line) for line in gzip.open(ev.humaneval_path(), "rt")]
    results = executor.run_many([(ev.humaneval_program(r, r["prompt"] + r["canonical_solution"]), "") for r in rows])
    failing = {r["task_id"] for r, res in zip(rows, results) if not (res.status == "ok" and res.value == "True")}
    assert failing == set(ev.HUMANEVAL_SKIPPED)
    assert len(ev.load_bench("humaneval", None, None)) == 164 - len(ev.HUMANEVAL_SKIPPED) == 157
    # a body alone fails (the function would return None), a wrong function fails its tests
    first = rows[0]
    assert executor.run(ev.humaneval_program(first, "x = 1"), "").status == "error"
    assert executor.run(ev.humaneval_program(first, "def has_close_elements(a, b):\n    return True"), "").status == "error"


def test_read_number_and_the_interval():
    assert ev.read_number("$1,250.00") == 1250.0 and ev.read_number("about -3 or 7.5 boxes") == 7.5
    assert ev.read_number("none") is None
    low, high = ev.wilson(7, 64)
    assert 0.05 < low < 0.06 and 0.20 < high < 0.21          # 11% of 64: [5.4%, 20.9%]
    assert ev.wilson(0, 10)[0] == 0.0 and ev.wilson(10, 10)[1] == 1.0


# --------------------------------------------------------------------------------------------------
# Graders, with scripted answers


@pytest.mark.parametrize("bench", ev.BENCHES)
def test_right_answers_score_100_wrong_ones_0_and_unreadable_ones_are_format_errors(bench, files, tiny, executor):
    items = load(bench, files, limit=3)
    right = ev.summarize(ev.run_bench(Scripted(tiny, items, right_answer), executor, items, 16, 8))
    assert right["correct"] == right["n"] == len(items) and right["accuracy"] == 1.0 and right["format_errors"] == 0
    wrong = ev.summarize(ev.run_bench(Scripted(tiny, items, wrong_answer), executor, items, 16, 8))
    assert wrong["correct"] == 0 and wrong["wrong"] == len(items) and wrong["format_errors"] == 0
    garbled = ev.summarize(ev.run_bench(Scripted(tiny, items, lambda i: "I think it is 4"), executor, items, 16, 8))
    assert garbled["correct"] == 0 and garbled["format_errors"] == len(items) and garbled["well_formed"] == 0.0


def test_abduction_is_graded_by_running_f_on_the_predicted_input(tiny, executor, files):
    items = load("cruxeval-i", files)[2:]                     # f(a, b) = a * b, output 12
    other = ev.run_bench(Scripted(tiny, items, lambda i: answer(("input", "6, 2"))), executor, items, 16, 8)
    assert other[0].correct and other[0].answer == "6, 2"     # another input with the same output


def test_selfplay_summary_has_one_row_per_task_type(tiny, executor, files):
    items = load("selfplay", files)
    summary = ev.summarize(ev.run_bench(Scripted(tiny, items, right_answer), executor, items, 16, 8))
    assert set(summary["per_type"]) == {DEDUCTION, ABDUCTION, INDUCTION}
    assert all(s["n"] == 1 and s["correct"] == 1 for s in summary["per_type"].values())


# --------------------------------------------------------------------------------------------------
# End to end: the tiny model through the command line


def test_cli_writes_a_report_and_gives_the_same_numbers_twice(tmp_path, files, one_thread):
    for bench in ("cruxeval-o", "gsm8k"):
        argv = ["--model", "tiny", "--bench", bench, "--data", str(files[bench]), "--limit", "2",
                "--max-new-tokens", "12"]
        first = ev.main(argv + ["--out", str(tmp_path / "1.json")])[0]
        second = ev.main(argv + ["--out", str(tmp_path / "2.json")])[0]
        report = json.loads((tmp_path / "1.json").read_text())
        for key in ("bench", "model", "adapter", "step", "limit", "max_new_tokens", "decoding", "wall_s", "summary", "items"):
            assert key in report
        assert report["bench"] == bench and report["decoding"] == "greedy" and len(report["items"]) == 2
        for key in ("n", "correct", "wrong", "format_errors", "accuracy", "interval", "well_formed", "truncated"):
            assert key in report["summary"]
        assert first["summary"] == second["summary"]
        assert [o["completion"] for o in first["items"]] == [o["completion"] for o in second["items"]]
        assert all(o["tokens"] <= 12 for o in report["items"])


def test_an_adapter_from_a_run_is_loaded_with_its_step_and_weights(tmp_path, one_thread):
    run = run_tiny(tmp_path / "run", "--steps", "1")
    checkpoint = latest_checkpoint(run)
    # float32: merging in bf16 rounds the merged weights, a difference of 1e-2 (a bf16 CPU picks it for "auto")
    policy, info = ev.load_model(None, str(run), "float32", "cpu")  # a run folder: its newest checkpoint
    assert info == {"model": "tiny", "adapter": str(checkpoint), "step": 1}
    import peft
    saved = peft.load_peft_weights(str(checkpoint / "adapter"))
    loaded = peft.get_peft_model_state_dict(policy.model)
    assert saved.keys() == loaded.keys() and all((saved[k] == loaded[k]).all() for k in saved)
    assert any(saved[k].abs().sum() > 0 for k in saved if "lora_B" in k)   # trained, not the zero init
    # the adapter is folded into the weights, and answers as the unmerged adapter does
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        merged = policy.model(input_ids=ids).logits
        policy.model.unmerge_adapter()
        unmerged = policy.model(input_ids=ids).logits
        with policy.model.disable_adapter():
            base = policy.model(input_ids=ids).logits
    assert torch.allclose(merged, unmerged, atol=1e-5) and not torch.allclose(merged, base, atol=1e-5)
    with pytest.raises(SystemExit, match="not a checkpoint folder"):
        ev.load_model(None, str(tmp_path), "auto", "cpu")


def test_make_selfplay_writes_tasks_that_load_back(tmp_path, tiny, executor):
    path = tmp_path / "held.jsonl"
    cfg = azr_mini.parse_args(TINY_FLAGS)
    ev.make_selfplay(HalfScripted(tiny), executor, path, per_type=2, seed=5, rounds=4, max_new_tokens=cfg.max_new_tokens)
    items = ev.load_bench("selfplay", str(path), None)
    assert items and {i.kind for i in items} <= {DEDUCTION, ABDUCTION, INDUCTION}
    assert all(i.task.program != "def f(a):\n    return a" for i in items if i.kind != INDUCTION)  # not the seed


def test_bad_flags_exit_with_a_message(capsys):
    for argv, code, message in ((["--bench", "mmlu"], 2, "unknown mmlu"),
                                (["--bench", "cruxeval-o,gsm8k", "--data", "x.jsonl"], 2, "one --bench"),
                                (["--limit", "0"], 2, "--limit must be positive")):
        with pytest.raises(SystemExit) as exit_info:
            ev.main(argv)
        assert exit_info.value.code == code and message in capsys.readouterr().err
    with pytest.raises(SystemExit, match="no such file"):   # before any model is loaded
        ev.main(["--model", "tiny", "--bench", "gsm8k", "--data", "/nonexistent.jsonl"])
