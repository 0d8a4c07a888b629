"""Tokenisation, truncation, splitting and collation shared by the SFT, reward-model, DPO and PPO recipes.

Label convention (as everywhere in alignflow): ``labels`` are aligned with ``input_ids`` (unshifted) and
``-100`` marks tokens that carry no loss (prompt, padding). The causal shift and token counting happen in
:mod:`alignflow.train.logprobs`, never here.

Truncation rule (one rule for all recipes, see :func:`fit_lengths`): when ``prompt + completion`` is longer
than the budget, the prompt is cut from the LEFT (its end, next to the completion, is what matters) to at
most ``max_prompt_length`` tokens (default half the budget, or more if the completion is short), then the
completion is cut from the right. ``keep_completion=True`` (the reward model's choice: it judges the whole
response) cuts only the prompt, from the left, unless the completion alone does not fit. Every cut is
counted by a :class:`TruncationCounter` (cut completions separately); nothing is dropped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from rich.console import Console

from alignflow.data.packing import TokenBudgetSampler, TreeBatch, pack_prefix_trees, shared_prefix_length
from alignflow.data.prompts import bos_prefix
from alignflow.errors import DataFormatError
from alignflow.splits import prompt_bucket
from alignflow.train.logprobs import IGNORE_INDEX

console = Console(stderr=True, soft_wrap=True)
Row = TypeVar("Row")


class TruncationCounter:
    """Counts examples cut to the maximum length so a recipe can warn once, with the number."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.count = 0
        self.completions_cut = 0
        self.total = 0

    def add(self, truncated: bool, completion_cut: bool = False) -> None:
        """Count one example; ``truncated`` when anything was cut, ``completion_cut`` when its completion was."""
        self.total += 1
        self.count += int(truncated)
        self.completions_cut += int(completion_cut)

    def report(self) -> None:
        if self.count:
            console.print(
                f"[yellow]warning:[/] {self.count} of {self.total} {self.what} were longer than the maximum "
                f"length and were truncated ({self.completions_cut} with the completion cut; none dropped)"
            )


# ---------------------------------------------------------------------------------------------------------------------
# splitting


def split_by_prompt(
    rows: Sequence[Row], fraction: float, prompt_of: Callable[[Row], str] | None = None
) -> tuple[list[Row], list[Row]]:
    """Split rows into (train, eval): a row goes to eval when its prompt's hash bucket is below ``fraction``.

    All rows sharing a prompt land on the same side, so eval never sees a training prompt. Rows are
    mappings or objects: ``prompt_of(row)`` defaults to ``row["prompt"]`` (SFT rows with ``messages`` use
    :func:`sft_prompt_key`, preference pairs ``lambda p: p.prompt``).
    """
    key = prompt_of or (lambda r: r["prompt"] or "")
    train, held = [], []
    for r in rows:
        (held if prompt_bucket(key(r)) < fraction else train).append(r)
    return train, held


def sft_prompt_key(row: Mapping[str, Any]) -> str:
    if row.get("messages"):
        return json.dumps(row["messages"][:-1], sort_keys=True)
    return row.get("prompt") or ""


# ---------------------------------------------------------------------------------------------------------------------
# truncation


def fit_lengths(
    n_prompt: int, n_completion: int, budget: int, max_prompt: int | None, keep_completion: bool = False
) -> tuple[int, int]:
    """How many prompt tokens (kept from the end) and completion tokens (kept from the start) fit in ``budget``.

    Default: the prompt keeps up to ``max_prompt`` tokens (half the budget when unset, more when the completion
    is short), the completion the rest. ``keep_completion``: the completion is kept whole and the prompt gets
    what is left (at most ``max_prompt``); only a completion longer than the budget is cut, and then the prompt
    still keeps its last ``budget // 8`` tokens, because a response judged without the question it answers
    is judged blind.
    """
    if n_prompt + n_completion <= budget:
        return n_prompt, n_completion
    if keep_completion:
        keep_c = min(n_completion, budget - min(n_prompt, budget // 8))
        keep_p = min(n_prompt, budget - keep_c, max_prompt if max_prompt is not None else budget)
        return keep_p, keep_c
    cap = max_prompt if max_prompt is not None else budget // 2
    keep_p = min(n_prompt, max(cap, budget - n_completion), budget)
    keep_c = min(n_completion, budget - keep_p)
    return keep_p, keep_c


def _ids(tok: Any, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"]) if text else []


@dataclass
class Encoded:
    """One tokenised sequence: ``input_ids``, ``labels`` (-100 on the prompt) and BERT ``token_type_ids``."""

    input_ids: list[int]
    labels: list[int]
    token_type_ids: list[int] | None = None


class SequenceEncoder:
    """Turns (prompt, completion) text into token ids for a causal LM or a BERT-style encoder.

    Causal: ``[bos] prompt completion eos`` (bos only if the tokenizer has one), labels on the completion
    and the eos. Encoder: ``[CLS] prompt [SEP] completion [SEP]`` with token types 0/1 (no labels used).
    ``max_length`` counts every token including the special ones; ``keep_completion`` is
    :func:`fit_lengths`' rule.
    """

    def __init__(
        self,
        tokenizer: Any,
        max_length: int,
        max_prompt_length: int | None = None,
        encoder: bool = False,
        counter: TruncationCounter | None = None,
        keep_completion: bool = False,
    ) -> None:
        self.tok = tokenizer
        self.max_length = max_length
        self.max_prompt_length = max_prompt_length
        self.encoder = encoder
        self.keep_completion = keep_completion
        self.counter = counter or TruncationCounter("examples")
        if encoder and (tokenizer.cls_token_id is None or tokenizer.sep_token_id is None):
            raise DataFormatError(
                "encoder backbone needs a tokenizer with cls and sep tokens (a BERT-style tokenizer)"
            )
        if not encoder and tokenizer.eos_token_id is None:
            raise DataFormatError("causal backbone needs a tokenizer with an eos token")

    def _finish(self, p: list[int], c: list[int], prefix: list[int], suffix: list[int]) -> Encoded:
        budget = self.max_length - len(prefix) - len(suffix) - (1 if self.encoder else 0)
        if budget < 2:
            raise DataFormatError(
                f"data.max_length={self.max_length} leaves no room for prompt and completion"
            )
        keep_p, keep_c = fit_lengths(len(p), len(c), budget, self.max_prompt_length, self.keep_completion)
        self.counter.add(keep_p < len(p) or keep_c < len(c), keep_c < len(c))
        p, c = p[len(p) - keep_p :], c[:keep_c]
        if self.encoder:
            cls, sep = self.tok.cls_token_id, self.tok.sep_token_id
            ids = [cls, *p, sep, *c, sep]
            types = [0] * (len(p) + 2) + [1] * (len(c) + 1)
            return Encoded(ids, [IGNORE_INDEX] * len(ids), types)
        head = [*prefix, *p]
        tail = [*c, *suffix]
        return Encoded(head + tail, [IGNORE_INDEX] * len(head) + tail)

    def encode(self, prompt: str, completion: str) -> Encoded:
        """Plain prompt/completion formatting (the text is used as is; no chat template)."""
        prefix = [] if self.encoder else bos_prefix(self.tok)  # the one BOS rule (data/prompts.py)
        suffix = [] if self.encoder else [self.tok.eos_token_id]
        return self._finish(_ids(self.tok, prompt), _ids(self.tok, completion), prefix, suffix)

    def encode_messages(self, messages: Sequence[Mapping[str, str]]) -> Encoded:
        """Chat-template formatting: loss on the last (assistant) turn only, including its end-of-turn tokens.

        The prompt is the template applied to all earlier turns with ``add_generation_prompt=True``; the
        completion is what the full conversation adds after it. Template special tokens are in the text, so
        the parts are tokenised without adding more.
        """
        if self.tok.chat_template is None:
            raise DataFormatError(
                "dataset rows use 'messages' but the tokenizer has no chat_template; "
                "add one to the tokenizer directory or use prompt/completion rows"
            )
        msgs = [dict(m) for m in messages]
        prompt = self.tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        full = self.tok.apply_chat_template(msgs, tokenize=False)
        if not full.startswith(prompt):
            raise DataFormatError(
                "the tokenizer's chat_template does not render the conversation as prompt + last turn; "
                "cannot tell which tokens belong to the completion"
            )
        return self._finish(_ids(self.tok, prompt), _ids(self.tok, full[len(prompt) :]), [], [])

    def encode_sft_row(self, row: Mapping[str, Any]) -> Encoded:
        if row.get("messages"):
            return self.encode_messages(row["messages"])
        return self.encode(row.get("prompt") or "", row["completion"])


# ---------------------------------------------------------------------------------------------------------------------
# collation


def pad_batch(
    items: Sequence[Encoded], pad_token_id: int, device: torch.device | str
) -> dict[str, torch.Tensor]:
    """Right-pad to the longest item: ``input_ids``, ``attention_mask``, ``labels`` (and ``token_type_ids``), each ``(B, T)``."""
    width = max(len(e.input_ids) for e in items)
    b = len(items)
    ids = torch.full((b, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    labels = torch.full((b, width), IGNORE_INDEX, dtype=torch.long)
    types = torch.zeros((b, width), dtype=torch.long) if items[0].token_type_ids is not None else None
    for i, e in enumerate(items):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        mask[i, :n] = 1
        labels[i, :n] = torch.tensor(e.labels)
        if types is not None and e.token_type_ids is not None:
            types[i, :n] = torch.tensor(e.token_type_ids)
    out = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if types is not None:
        out["token_type_ids"] = types
    return {k: v.to(device) for k, v in out.items()}


def model_kwargs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The forward-pass inputs of a padded batch (labels excluded: losses are computed by alignflow.train)."""
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


# ---------------------------------------------------------------------------------------------------------------------
# pairs


@dataclass
class Pair:
    """One preference pair after expansion: ``weight`` is the dataset's weight / soft label; ``labels`` the
    per-dimension P(chosen better) of a pairs row's ``meta["labels"]`` (empty when it has none)."""

    id: str
    prompt: str
    chosen: str
    rejected: str
    weight: float = 1.0
    labels: Mapping[str, float] = field(default_factory=dict)


def pair_labels(meta: str | Mapping[str, Any] | None) -> dict[str, float]:
    """The per-dimension labels of a stored pairs row (``meta["labels"]``, validated at import), as floats."""
    if not meta:
        return {}
    obj = json.loads(meta) if isinstance(meta, str) else meta
    labels = obj.get("labels") if isinstance(obj, Mapping) else None
    return {str(k): float(v) for k, v in labels.items() if v is not None} if labels else {}


def rows_to_pairs(rows: Sequence[Mapping[str, Any]], kind: str) -> list[Pair]:
    """Pairs rows as they are; rankings rows expanded to every (better, worse) pair, i < j in the best-first ranking."""
    out: list[Pair] = []
    if kind == "pairs":
        for r in rows:
            w = r.get("weight")
            out.append(
                Pair(
                    str(r["id"]),
                    r["prompt"] or "",
                    r["chosen"],
                    r["rejected"],
                    1.0 if w is None else float(w),
                    pair_labels(r.get("meta")),
                )
            )
        return out
    if kind != "rankings":
        raise DataFormatError(f"preference data must be 'pairs' or 'rankings', got {kind!r}")
    for r in rows:
        comps, ranking = r["completions"], r["ranking"]
        for i in range(len(ranking)):
            for j in range(i + 1, len(ranking)):
                a, b = ranking[i], ranking[j]
                out.append(Pair(f"{r['id']}:{a}>{b}", r["prompt"] or "", comps[a], comps[b], 1.0))
    return out


@dataclass
class EncodedPair:
    id: str
    chosen: Encoded
    rejected: Encoded
    weight: float
    labels: Mapping[str, float] = field(default_factory=dict)

    @property
    def length(self) -> int:
        return max(len(self.chosen.input_ids), len(self.rejected.input_ids))


def encode_pairs(pairs: Sequence[Pair], encoder: SequenceEncoder) -> list[EncodedPair]:
    return [
        EncodedPair(
            p.id, encoder.encode(p.prompt, p.chosen), encoder.encode(p.prompt, p.rejected), p.weight, p.labels
        )
        for p in pairs
    ]


def pack_pairs(items: Sequence[EncodedPair], pad_token_id: int, device: torch.device | str) -> TreeBatch:
    """Pairs as two-branch prefix trees (shared prompt once, then chosen, then rejected), packed into rows.

    Causal backbones only: an encoder's bidirectional attention would let the prompt see the responses.
    """
    trees = []
    for p in items:
        c, r = p.chosen, p.rejected
        n = shared_prefix_length(c.input_ids, c.labels, r.input_ids, r.labels)
        trees.append(
            (
                c.input_ids[:n],
                [(c.input_ids[n:], c.labels[n:]), (r.input_ids[n:], r.labels[n:])],
            )
        )
    return pack_prefix_trees(trees, pad_token_id).to(device)


# ---------------------------------------------------------------------------------------------------------------------
# sampling


def make_sampler(
    lengths: Sequence[int],
    batch_size: int,
    max_length: int,
    seed: int,
    packed: bool = False,
    token_budget: int | None = None,
) -> TokenBudgetSampler:
    """A seeded, resumable sampler of micro-batches.

    Unpacked: up to ``batch_size`` examples of similar length per micro-batch. Packed: as many examples as
    fill ``batch_size`` rows of ``max_length`` tokens (a token budget), so packing raises tokens per step.

    ``token_budget`` (``train.tokens_per_batch``, resolved by :func:`alignflow.train.memory.resolve_token_budget`)
    caps a micro-batch's tokens instead of ``batch_size * max_length``: padded, rows x the longest example
    (still at most ``batch_size`` rows); packed, the examples' total, at most ``batch_size * max_length``. None
    keeps ``batch_size * max_length``.
    """
    budget = batch_size * max_length
    if token_budget is not None:
        if token_budget <= 0:
            raise ValueError(f"token_budget must be positive, got {token_budget}")
        budget = min(token_budget, budget) if packed else token_budget
    if packed:
        return TokenBudgetSampler(lengths, budget, seed=seed, mode="packed")
    return TokenBudgetSampler(lengths, budget, seed=seed, mode="padded", max_batch_size=batch_size)


def endless(sampler: TokenBudgetSampler) -> Iterator[list[int]]:
    """Micro-batches across epochs; the sampler's ``state_dict()`` after each yield resumes right after it."""
    while True:
        yield from sampler


def steps_for(sampler: TokenBudgetSampler, grad_accum: int, epochs: float, max_steps: int | None) -> int:
    """Optimizer steps of a run: ``max_steps`` if set, else ``ceil(epochs * micro-batches / grad_accum)``."""
    if max_steps is not None:
        return max_steps
    return max(1, -(-int(round(epochs * len(sampler))) // grad_accum))
