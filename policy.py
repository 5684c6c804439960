"""The policy pi_theta: one causal language model that plays both AZR roles.

In Absolute Zero (Zhao et al. 2025, Algorithm 1) a single model proposes tasks and solves them; the
prompt alone says which role it plays. This file holds what the algorithm (azr_mini.py) asks of that
model, and nothing about how the model is found and loaded (models.py, whose `load_policy` returns
a Policy):

- formatting a conversation as the model's prompt (`Policy.format_chat`);
- sampling rollouts in batches, in-process, with a short decoding loop of our own (`Policy.generate`);
- the per-token log-probabilities log pi_theta(y_t | x, y_<t) that the TRR++ update (Eq. 8) needs
  (`Policy.token_logprobs`).

Where it departs from the paper's setup:
- The paper samples its rollouts with vLLM on several 80 GB GPUs; here rollouts come from the model
  in the trainer's process - slower, but nothing else to install or start. The decoding loop does
  what matters on one machine: the prefix a batch's prompts share is computed once, each prompt's
  rest is prefilled without padding, and a finished row leaves the batch at once, a waiting prompt
  taking its place. The update does the same with gradients: a prompt prefix (system message,
  worked example) is run once for the rows of a micro-batch that share it, and each row's own
  tokens run on top, unpadded (PrefixCache).
- Precision: the same weights in the same dtype (models.py: --dtype) sample the rollouts and score
  them in the update (LoRA weights float32, log-softmax float32), so sampler and scorer differ only
  by the order of floating-point sums (batched decoding with a cache against one full forward), not
  by precision.
- On-policy, exactly: sampling takes temperature and top-p only (the paper: T = 1, top-p = 1), never
  the top-k or repetition penalty that a model's generation_config.json may set, and LoRA dropout
  is 0 by default (dropout would make the update's gradient belong to another policy than the one
  that sampled).
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint
from tqdm import tqdm
from transformers import DynamicCache, PreTrainedConfig, PreTrainedModel, PreTrainedTokenizerBase

# ----------------------------------------------------------------------------------------------------
# Records


@dataclass
class Completion:
    """One sampled response."""

    prompt_ids: list[int]  # the prompt's tokens (what the model was conditioned on)
    ids: list[int]  # generated tokens; ends with the EOS token or the token completing a stop string
    text: str  # the generated text, special tokens dropped, cut right after a stop string
    truncated: bool  # hit max_new_tokens without EOS or a stop string
    entropy: float | None = None  # mean entropy (nats) of the distribution each token was drawn from


def length_sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first: similar lengths waste little
    padding, and an out-of-memory error shows up on the first batch rather than the last."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def prefix_order(rows: list[list[int]]) -> list[int]:
    """Indices in the order of their rows' tokens: prompts that share a system message and worked
    example become neighbours."""
    return sorted(range(len(rows)), key=lambda i: rows[i])


def prefix_sorted_batches(rows: list[list[int]], batch_size: int) -> list[list[int]]:
    """Indices in prefix_order, cut into batches."""
    order = prefix_order(rows)
    return [order[start:start + batch_size] for start in range(0, len(order), batch_size)]


def stop_end(text: str, stop_strings: list[str]) -> int | None:
    """Index just past the earliest-ending stop string in text, or None: generation halts the moment
    any stop string is complete, so the earliest end is where it halted."""
    ends = [text.index(s) + len(s) for s in stop_strings if s in text]
    return min(ends) if ends else None


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, greedy: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One token per row, and the entropy H = -sum_v p_v log p_v (nats) of the distribution it was
    drawn from. Temperature and top-p only, as in the paper (T = 1, top-p = 1): no top-k, no
    repetition penalty, whatever a model's generation_config.json says. Greedy takes the argmax and
    reports the entropy at T = 1."""
    logits = logits.float()  # [a, V]
    if not greedy:
        logits = logits / temperature
        if top_p < 1.0:  # nucleus: keep the most likely tokens whose probabilities sum to top_p
            sorted_logits, order = logits.sort(dim=-1, descending=True)  # [a, V]
            sorted_probs = sorted_logits.softmax(-1)  # [a, V]
            before = sorted_probs.cumsum(-1) - sorted_probs  # [a, V] the mass above each token
            sorted_logits.masked_fill_(before >= top_p, -torch.inf)  # the first token always stays
            logits = torch.full_like(logits, -torch.inf).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)  # [a, V], 0 where top-p removed a token
    entropy = torch.special.entr(probs).sum(-1)  # [a]: -sum p log p, with 0 log 0 = 0
    if greedy:
        return logits.argmax(-1), entropy  # [a], [a]
    # Inverse-CDF sampling: one uniform number per row, located in the cumulative distribution (float64,
    # so that 152k small probabilities add up exactly enough; right=True never picks a zero-probability
    # token). Exactly a draw from probs, and 14 ms per step at batch 16 where torch.multinomial took 51.
    cdf = probs.cumsum(-1, dtype=torch.float64)  # [a, V]
    u = torch.rand(cdf.shape[0], 1, dtype=torch.float64, device=cdf.device) * cdf[:, -1:]  # [a, 1]
    tokens = torch.searchsorted(cdf, u, right=True).squeeze(-1).clamp(max=cdf.shape[1] - 1)  # [a]
    return tokens, entropy


def shared_prefix_length(rows: list[list[int]]) -> int:
    """How many leading tokens all rows share, leaving each row at least its last token (whose
    logits start its own completion)."""
    n = min(len(r) for r in rows) - 1
    for k in range(n):
        if any(r[k] != rows[0][k] for r in rows):
            return k
    return max(n, 0)


def prefix_groups(rows: list[list[int]], start: int, min_gain: int = 32) -> list[tuple[list[int], int]]:
    """Neighbouring rows that share a longer prefix than the batch-wide one (`start` tokens), as
    (row indices, shared length) groups: with prompts sorted, the requests of one kind (system
    message and worked example) sit together. A row joins the group before it while they share at
    least start + min_gain tokens; a row alone shares only `start`."""
    groups: list[tuple[list[int], int]] = []
    for i, row in enumerate(rows):
        if groups:
            members, shared = groups[-1]
            first = rows[members[0]]
            limit = min(shared, len(row) - 1, len(first) - 1)
            k = 0
            while k < limit and row[k] == first[k]:
                k += 1
            if k >= start + min_gain:
                groups[-1] = (members + [i], k)
                continue
        groups.append(([i], len(row) - 1))
    return [(members, shared if len(members) > 1 else start) for members, shared in groups]


# Keys and values of a prefix, one (keys, values) pair per layer, each [1, kv_heads, length, head_dim].
KeysValues = list[tuple[torch.Tensor, torch.Tensor]]


class PrefixCache(DynamicCache):
    """A key/value cache that holds a prefix and never grows, for the update's forward passes.

    Each attention layer calls `update` with the keys and values of the tokens being run and gets
    back the prefix's followed by theirs: the tokens attend to the prefix and to each other. Those
    are kept in `states` (prefix + tokens, by layer) for a next pass to build on, but the cache itself
    does not grow. That matters under gradient checkpointing: backward replays each layer's forward,
    and in a cache that grew during the first run (a DynamicCache) the replay would find the tokens
    already there and attend to them twice. Here the replay sees the same prefix and computes the same
    numbers. All tensors stay in the autograd graph, so backward reaches the prefix's LoRA weights
    through every row that read the prefix, and adds up their gradients."""

    def __init__(self, prefix: KeysValues, config: PreTrainedConfig):
        super().__init__(ddp_cache_data=prefix or None, config=config)  # copies the prefix, in the graph
        self.states: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if layer.is_initialized:  # a prefix: [1, kv_heads, prefix, head_dim] then [1, kv_heads, new, head_dim]
            key_states = torch.cat([layer.keys, key_states], dim=-2)
            value_states = torch.cat([layer.values, value_states], dim=-2)
        self.states[layer_idx] = (key_states, value_states)  # replaced, never appended to
        return key_states, value_states


class RunningBatch:
    """The rows that `Policy.generate` decodes together, one token per row per step.

    Their key/value caches are stacked into one, each row padded on the left to the longest, with an
    attention mask that hides the padding; a row's positions count its own tokens only. A row that
    finishes leaves (`keep`); prefilled prompts join (`add`) at the end, so the rows are in the order
    they joined, and so are their random draws in sample_next: same seed, same outputs."""

    def __init__(self, config: PreTrainedConfig):
        self.config = config
        self.rows: list[int] = []  # which prompt each row decodes
        # Set by the first `add`; W is the common width.
        self.cache: DynamicCache | None = None  # per layer [a, kv_heads, W, head_dim]
        self.attention_mask: torch.Tensor | None = None  # [a, W]: 0 on padding, 1 on the row's tokens
        self.logits: torch.Tensor | None = None  # [a, V]: the distribution of each row's next token

    def add(self, rows: list[int], prefilled: list[tuple[DynamicCache, torch.Tensor]]) -> None:
        """Prompts join: for each, its cache ([1, kv_heads, length, head_dim] per layer) and the logits
        after its last token ([V]). Every row is padded on the left to the longest row; leading
        columns that are padding in every running row (the rows that needed them have left) are cut."""
        device = prefilled[0][1].device
        blocks = [(self.cache, self.attention_mask, self.logits)] if self.rows else []  # the running rows
        for cache, logits in prefilled:
            mask = torch.ones(1, cache.get_seq_length(), dtype=torch.long, device=device)  # [1, length]
            blocks.append((cache, mask, logits[None]))
        width = max(int(mask.sum(1).max()) for _, mask, _ in blocks)  # the longest row, in tokens
        # Built layer by layer, so that the keys and values are held twice at most: in the blocks and merged.
        merged = DynamicCache(config=self.config)
        for layer in range(len(prefilled[0][0].layers)):
            keys, values = [], []
            for cache, mask, _ in blocks:
                pad = width - mask.shape[1]  # < 0 cuts leading columns, padding in every row of the block
                keys.append(F.pad(cache.layers[layer].keys, (0, 0, pad, 0)))  # [b, kv_heads, width, head_dim]
                values.append(F.pad(cache.layers[layer].values, (0, 0, pad, 0)))
            merged.update(torch.cat(keys), torch.cat(values), layer)  # [a, kv_heads, width, head_dim] x2
        self.cache = merged
        masks = [F.pad(mask, (width - mask.shape[1], 0)) for _, mask, _ in blocks]  # [b, width] each
        self.attention_mask = torch.cat(masks)  # [a, width]
        self.logits = torch.cat([logits for _, _, logits in blocks])  # [a, V]
        self.rows = self.rows + rows

    def keep(self, keep: list[int]) -> None:
        """Only the rows at positions `keep` stay; the others leave, and their caches with them."""
        index = torch.tensor(keep, dtype=torch.long, device=self.logits.device)
        self.cache.batch_select_indices(index)
        self.attention_mask, self.logits = self.attention_mask[index], self.logits[index]
        self.rows = [self.rows[j] for j in keep]

    def step(self, model: PreTrainedModel, tokens: torch.Tensor) -> None:
        """Feed each row its next token (tokens [a]): one forward pass, the cache one column wider."""
        positions = self.attention_mask.sum(1, keepdim=True)  # [a, 1]: the row's tokens so far
        self.attention_mask = F.pad(self.attention_mask, (0, 1), value=1)  # [a, W + 1]
        out = model(input_ids=tokens[:, None], attention_mask=self.attention_mask, position_ids=positions,
                    cache=self.cache, use_cache=True)
        self.logits = out.logits[:, -1]  # [a, V]


# ----------------------------------------------------------------------------------------------------
# The policy


class Policy:
    """A causal LM with LoRA adapters, its tokenizer and its device."""

    # Completion positions projected onto the vocabulary at once (completion_logprobs), all rows' packed
    # end to end: 256 x 152k float32 logits are 155 MB (the 4 rows x 64 positions of a cpu-preset
    # micro-batch before the rows were packed).
    logprob_chunk = 256

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, device: torch.device):
        self.model, self.tokenizer, self.device = model, tokenizer, device
        # Instruct models end a turn with <|im_end|>, base models with <|endoftext|>: stop at any of
        # the tokenizer's and the model's end tokens.
        eos = {tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<|endoftext|>")}
        config_eos = model.generation_config.eos_token_id
        eos |= set(config_eos if isinstance(config_eos, list) else [config_eos])
        self.eos_ids = sorted(i for i in eos if i is not None and i != tokenizer.unk_token_id)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_ids[0]

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        """The LoRA weights: what the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    # --- prompts ---

    def format_chat(self, messages: str | list[dict[str, str]], prefill: str = "") -> str:
        """The prompt string for a conversation, ready for `generate`: a list of {"role", "content"}
        messages (system, user, assistant, ...; prompts.Chat.messages()) or one user message.

        With a chat template (instruct models) the messages go through it and the assistant turn is
        opened; a base model without one gets plain text: the system message, then "User: ..." and
        "Assistant: ..." turns, ending with an open "Assistant: ". `prefill` is appended as the start
        of the assistant's answer (e.g. "<think>"): the completion continues after it, so
        Completion.text does not contain it."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if self.tokenizer.chat_template:
            prompt = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        else:
            names = {"user": "User: ", "assistant": "Assistant: ", "system": ""}
            prompt = "".join(f"{names[m['role']]}{m['content']}\n\n" for m in messages) + "Assistant: "
        return prompt + prefill

    def encode(self, text: str) -> list[int]:
        # No special tokens added: the chat template already wrote the ones the model expects.
        return self.tokenizer.encode(text, add_special_tokens=False)

    # --- sampling ---

    @torch.inference_mode()
    def generate(
        self,
        prompts: list[str],
        max_new_tokens: int = 512,
        temperature: float = 1.0,
        top_p: float = 1.0,
        greedy: bool = False,
        gen_batch_size: int = 16,
        stop_strings: list[str] | None = None,
        desc: str | None = None,
        refill: bool = True,
    ) -> list[Completion]:
        """Sample one completion per prompt (greedy=True: argmax decoding), in input order.

        Prompts are sorted by their tokens, so that those of one kind are neighbours, and decoded
        together, at most gen_batch_size at a time:
          1. the prefix all prompts share (the chat template, the system message) is run once, and so
             is the longer prefix each group of neighbours shares (a worked example); the rest of each
             prompt is run alone on a copy of that cache, no padding to compute (`_prefill`);
          2. the prompts' caches join the running batch, left-padded, the padding masked (RunningBatch);
          3. then one token per step (sample_next) for the rows running. A row that ends, at EOS, at a
             stop string such as "</answer>" or at max_new_tokens, leaves the batch and its cache at
             once, so it costs nothing more.
        A step costs about as much for a few rows as for a full batch, so rows that finish early make
        room for waiting prompts: once a quarter of the batch is free, the next ones are prefilled and
        join (refill=True), instead of the last slow rows decoding alone. refill=False starts prompts
        only when the batch is empty: batches one after the other (the benchmark's reference).
        The LoRA adapter is active: the policy samples its own rollouts. Same seed, same prompts, same
        outputs; greedy outputs are those of each prompt decoded alone, up to float rounding. `desc`
        shows a progress bar of the tokens generated under that name."""
        prompt_ids = [self.encode(p) for p in prompts]
        order = prefix_order(prompt_ids)
        rows = [prompt_ids[i] for i in order]
        stop_strings = stop_strings or []
        completions: list[Completion | None] = [None] * len(prompts)
        was_training = self.model.training
        self.model.eval()  # no LoRA dropout; checkpointing off, so the KV cache is used
        bar = tqdm(desc=desc, unit="tok", leave=False, dynamic_ncols=True, disable=desc is None)
        try:
            decoded = self._decode(rows, max_new_tokens, temperature, top_p, greedy, stop_strings,
                                   gen_batch_size, refill, bar)
            for i, (new_ids, entropies) in zip(order, decoded):
                completions[i] = self.make_completion(prompt_ids[i], new_ids, stop_strings)
                n = len(completions[i].ids)
                completions[i].entropy = sum(entropies[:n]) / n if n else None
        finally:
            bar.close()
            self.model.train(was_training)
        return completions

    def _extend(self, cache: DynamicCache, row: list[int], start: int, end: int) -> torch.Tensor:
        """Run row[start:end] on top of a cache holding row[:start]; the logits after its last token."""
        ids = torch.tensor([row[start:end]], device=self.device)  # [1, end - start]
        positions = torch.arange(start, end, device=self.device)[None]
        out = self.model(input_ids=ids, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]  # [V]

    def _prefill(self, rows: list[list[int]]) -> Iterator[tuple[DynamicCache, torch.Tensor]]:
        """Each row's prompt run through the model, one row after the other, when decoding asks for
        the next (a generator): its cache ([1, kv_heads, len(row), head_dim] per layer) and the
        logits after its last token ([V]). The prefix all rows share runs once; the longer prefix
        each group of neighbours shares (system message and worked example) runs once per group and
        is kept until the group's last row is out; each row's own rest runs alone, so there is no
        padding to compute and no mask to apply."""
        prefix = DynamicCache(config=self.model.config)
        shared = shared_prefix_length(rows)
        if shared:
            self._extend(prefix, rows[0], 0, shared)
        for members, group_shared in prefix_groups(rows, shared):
            group = prefix
            if group_shared > shared:
                group = copy.deepcopy(prefix)
                self._extend(group, rows[members[0]], shared, group_shared)
            for i in members:
                cache = copy.deepcopy(group)  # [1, kv_heads, group_shared, head_dim] per layer
                logits = self._extend(cache, rows[i], group_shared, len(rows[i]))  # [V]
                yield cache, logits

    def _decode(self, rows: list[list[int]], max_new_tokens: int, temperature: float, top_p: float,
                greedy: bool, stop_strings: list[str], gen_batch_size: int, refill: bool,
                bar: tqdm) -> list[tuple[list[int], list[float]]]:
        """(new token ids, entropy per token) for each row, rows in prefix order; see generate."""
        prefills = self._prefill(rows)
        batch = RunningBatch(self.model.config)
        started = 0  # rows[:started] have joined the batch; the others wait
        refill_at = max(1, gen_batch_size // 4)  # free slots that call for a refill (each costs a merge)
        out: list[tuple[list[int], list[float]]] = [([], []) for _ in rows]
        window = max((len(s) for s in stop_strings), default=0) + 1  # tokens: each is >= 1 character
        while started < len(rows) or batch.rows:
            free, waiting = gen_batch_size - len(batch.rows), len(rows) - started
            if waiting and (not batch.rows or (refill and free >= min(refill_at, waiting))):
                joining = list(range(started, started + min(free, waiting)))
                batch.add(joining, [next(prefills) for _ in joining])
                started += len(joining)
            tokens, entropy = sample_next(batch.logits, temperature, top_p, greedy)  # [a], [a]
            # The one wait for the device in a step: the host must see the tokens to decide which rows
            # go on (EOS, stop strings). The entropies come along in the same copy (float64 holds
            # every token id and every float32 entropy exactly).
            sampled, entropies_now = torch.stack([tokens.double(), entropy.double()]).tolist()
            keep = []  # positions in the batch of the rows that go on
            for j, (row, token, h) in enumerate(zip(batch.rows, map(int, sampled), entropies_now)):
                ids, entropies = out[row]
                ids.append(token)
                entropies.append(h)
                tail = self.tokenizer.decode(ids[-window:], skip_special_tokens=True) if stop_strings else ""
                stopped = token in self.eos_ids or any(s in tail for s in stop_strings)
                if not stopped and len(ids) < max_new_tokens:
                    keep.append(j)
            bar.set_postfix_str(f"{len(keep)} rows decoding, {len(rows) - started} waiting", refresh=False)
            bar.update(len(batch.rows))
            if len(keep) < len(batch.rows):  # finished rows leave the batch
                batch.keep(keep)
            if batch.rows:
                batch.step(self.model, tokens[keep])
        return out

    def make_completion(self, prompt_ids: list[int], new_ids: list[int], stop_strings: list[str]) -> Completion:
        """Cut one row at its first EOS (kept in ids: the policy must learn when to stop) or right
        after its first stop string, whichever comes first (decoding stopped the row there; this
        finds the exact cut in ids and text, and whether the row was truncated)."""
        end = next((k + 1 for k, t in enumerate(new_ids) if t in self.eos_ids), None)
        ids = new_ids[:end] if end else new_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cut = stop_end(text, stop_strings)
        if cut is not None:
            # The fewest tokens whose text holds the stop string (binary search: prefix texts grow).
            lo, hi = 1, len(ids)
            while lo < hi:
                mid = (lo + hi) // 2
                if stop_end(self.tokenizer.decode(ids[:mid], skip_special_tokens=True), stop_strings) is None:
                    lo = mid + 1
                else:
                    hi = mid
            # The last token may carry characters past the stop string ('>\n' in '</answer>\n'):
            # ids keep that whole token, text ends exactly after the stop string.
            ids, text = ids[:lo], text[:cut]
        return Completion(prompt_ids, ids, text, truncated=end is None and cut is None)

    # --- log-probabilities for the update ---

    def token_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                       share_prefix: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """log pi_theta(y_t | x, y_<t) for every completion token y_t, rows in input order.

        Returns (logp [B, T], mask [B, T]) with T the longest completion; mask is True on real tokens
        and logp is 0 elsewhere. Runs in train mode (LoRA dropout, gradient checkpointing) when
        autograd is on, in eval mode under torch.no_grad(). Memory grows with the rows: the update
        calls this once per micro-batch (prefix_sorted_batches gives the groups) and backwards each
        loss.

        Every prompt carries a system message and a worked example that others of its kind share.
        As in `generate`, the prefix all rows share is run once, and so is the longer one each group
        of neighbours shares (prefix_groups); each row then runs only its own tokens (the rest of its
        prompt, its completion) on top of them, one row at a time, so no position is padding. Unlike
        in `generate`, the prefix's keys and values keep their gradients (LoRA changes them too), and
        backward adds up what each row sends back to them (PrefixCache). With LoRA dropout (0 by
        default) the rows that share a prefix share its dropout mask too. share_prefix=False runs
        every row from its first token (the reference the tests compare with)."""
        was_training = self.model.training
        self.model.train(torch.is_grad_enabled())
        try:
            return self._logprobs(prompt_ids, completion_ids, share_prefix)
        finally:
            self.model.train(was_training)

    def _logprobs(self, prompts: list[list[int]], completions: list[list[int]], share_prefix: bool):
        assert min(len(p) for p in prompts) > 0, "a prompt needs at least one token"
        order = sorted(range(len(prompts)), key=lambda i: prompts[i])  # prompts of one kind become neighbours
        rows = [prompts[i] for i in order]
        if share_prefix and len(rows) > 1:
            shared = shared_prefix_length(rows)
            groups = prefix_groups(rows, shared)
        else:
            shared, groups = 0, [([j], 0) for j in range(len(rows))]
        batch_prefix: KeysValues = []
        if shared:  # 1. the prefix all rows share (chat template, system message)
            _, batch_prefix = self._run(rows[0][:shared], [])
        hidden: list[torch.Tensor | None] = [None] * len(prompts)
        for members, group_shared in groups:
            prefix = batch_prefix
            if group_shared > shared:  # 2. the longer prefix of this group (its worked example)
                _, prefix = self._run(rows[members[0]][shared:group_shared], batch_prefix)
            for j in members:  # 3. each row's own tokens on top
                i = order[j]
                out, _ = self._run(prompts[i][group_shared:] + completions[i], prefix)  # [1, S, H]
                first = len(prompts[i]) - group_shared - 1  # the position that predicts completion token 0
                hidden[i] = out[0, first:-1]  # [T_i, H]
        # The vocabulary projection for all rows at once, their completion positions packed end to end.
        packed = torch.cat(hidden)[None]  # [1, N, H], N = sum of T_i
        targets = torch.tensor([[t for c in completions for t in c]], device=self.device)  # [1, N]
        logps = self.completion_logprobs(packed, targets)[0].split([len(c) for c in completions])  # B x [T_i]
        return pad_rows(list(logps), 0.0)  # logp [B, T] (padding contributes 0), mask [B, T]; T: the longest

    def _run(self, ids: list[int], prefix: KeysValues) -> tuple[torch.Tensor, KeysValues]:
        """Run ids (one row) on top of a prefix's keys and values ([] for none), at the positions after
        it: the final hidden states [1, len(ids), H], and the keys and values of prefix + ids."""
        start = prefix[0][0].shape[-2] if prefix else 0
        causal_lm = self.model.get_base_model()  # LoRA lives inside its layers
        cache = PrefixCache(prefix, causal_lm.config)
        # use_cache=False: transformers makes no cache of its own; the layers read and fill ours all
        # the same (models.load_policy lets them keep it under gradient checkpointing).
        hidden = causal_lm.get_decoder()(
            input_ids=torch.tensor([ids], device=self.device),  # [1, S]
            position_ids=torch.arange(start, start + len(ids), device=self.device)[None],  # [1, S]
            cache=cache, use_cache=False,
        ).last_hidden_state  # [1, S, H]
        n_layers = causal_lm.config.num_hidden_layers
        if len(cache.states) != n_layers:  # a transformers that drops the cache would drop the prefix silently
            raise RuntimeError(f"{len(cache.states)} of {n_layers} layers read the prefix cache; "
                               "this transformers version runs the layers without it")
        return hidden, [cache.states[layer] for layer in range(n_layers)]

    def completion_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """log pi(target) from the hidden states that predict each target: hidden [b, T, H], targets
        [b, T] -> [b, T], float32. The vocabulary projection runs chunk by chunk: never a [b, T, V]
        tensor (V = 152k). Under autograd each chunk is checkpointed, so backward recomputes its logits
        instead of keeping them: memory grows with the chunk, not with the response."""
        head = self.model.get_base_model().get_output_embeddings()
        pieces = []
        for start in range(0, targets.shape[1], self.logprob_chunk):
            h, y = hidden[:, start: start + self.logprob_chunk], targets[:, start: start + self.logprob_chunk]
            if torch.is_grad_enabled():
                pieces.append(checkpoint(chosen_logprobs, head, h, y, use_reentrant=False))
            else:
                pieces.append(chosen_logprobs(head, h, y))
        return torch.cat(pieces, dim=1)  # [b, T]


def chosen_logprobs(head: torch.nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax of the chosen tokens only, in float32: logit - logsumexp over the vocabulary."""
    logits = head(hidden).float()  # [b, c, V]
    chosen = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [b, c] logit of the sampled token
    return chosen - torch.logsumexp(logits, dim=-1)  # [b, c]


def pad_rows(rows: list[torch.Tensor], value: float, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of different lengths (1-d tensors on one device) as one block, each padded with `value`
    to the longest, on the right (left=True: on the left), and the mask that is True on each row's own
    entries: ([b, W], [b, W]) with W the longest row."""
    width = max(len(r) for r in rows)
    padded = torch.stack([F.pad(r, (width - len(r), 0) if left else (0, width - len(r)), value=value)
                          for r in rows])  # [b, W]
    lengths = torch.tensor([len(r) for r in rows], device=padded.device)[:, None]  # [b, 1]
    columns = torch.arange(width, device=padded.device)[None]  # [1, W]
    mask = columns >= width - lengths if left else columns < lengths  # [b, W]
    return padded, mask


def left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch token lists, padded on the left so that generation continues every row in one column:
    token ids [b, P] and the attention mask [b, P] (1 on tokens, 0 on padding), both long."""
    ids, mask = pad_rows([torch.tensor(r, dtype=torch.long) for r in rows], pad_id, left=True)
    return ids.to(device), mask.long().to(device)
