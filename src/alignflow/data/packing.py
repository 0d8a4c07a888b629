"""Sequence packing and token-budget batching for SFT, reward-model and DPO training.

Packing
-------
:func:`pack_examples` places variable-length examples into rows of at most ``max_tokens`` tokens
(first-fit-decreasing or best-fit-decreasing bin packing) and returns a :class:`PackedBatch` with

* ``input_ids (R, L)``, ``labels (R, L)`` (HF convention: unshifted, ``-100`` = no loss),
* ``position_ids (R, L)`` restarting at 0 for every example (so RoPE sees the same positions as unpacked),
* ``attention_mask (R, 1, L, L)``: a boolean block-diagonal causal mask (True = may attend),
* ``seq_lens`` per row, ``cu_seqlens`` for the flattened layout, and each example's placement.

Why an explicit 4-D mask: in transformers 5.23 ``masking_utils._preprocess_mask_arguments`` returns a
4-D mask unchanged, and the SDPA integration passes a boolean mask straight to
``torch.nn.functional.scaled_dot_product_attention``; masked keys get probability exactly 0, so each
example's attention output equals the unpacked one up to float reduction order. (transformers can
also infer packing from ``position_ids`` when ``attention_mask is None``, but that silently depends
on the attention backend; the explicit mask is backend-independent on CPU.) Padding tokens form their
own causal segment so no query row is fully masked (a fully masked SDPA row yields NaN). Eager attention
adds the mask instead of selecting with it, so pass :meth:`PackedBatch.additive_mask` there.

The label of each example's first token is forced to ``-100``: with HF's internal shift, the logit at
the last token of example *a* would otherwise be trained to predict the first token of example *b*.
Unpacked, nothing predicts a first token, so this keeps packed and unpacked losses identical.

Token-budget batching
---------------------
:class:`TokenBudgetSampler` groups examples of similar length so that each batch's padded size
(``batch_size * longest``) — or, with ``mode="packed"``, its total token count — stays under a budget.
Batches of an epoch are a pure function of ``(seed, epoch, lengths)``, so the sampler resumes exactly
from ``state_dict()``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch

IGNORE_INDEX = -100

Example = Mapping[str, Sequence[int]] | Sequence[int]


@dataclass
class PackedBatch:
    """Packed rows; ``R`` rows of length ``L``. See the module docstring for the semantics."""

    input_ids: torch.Tensor  # (R, L) long
    labels: torch.Tensor  # (R, L) long, IGNORE_INDEX on prompts, padding and each example's first token
    position_ids: torch.Tensor  # (R, L) long, 0.. per example
    attention_mask: torch.Tensor  # (R, 1, L, L) bool, True = query may attend to key
    segment_ids: torch.Tensor  # (R, L) long, index of the example within its row; -1 on padding
    seq_lens: list[list[int]]  # real example lengths per row, in row order
    cu_seqlens: torch.Tensor  # (S+1,) int32 offsets into input_ids.view(-1); padding runs are own segments
    placements: list[tuple[int, int, int]] = field(default_factory=list)  # example i -> (row, start, length)

    @property
    def num_target_tokens(self) -> int:
        """Tokens that contribute to the loss after the causal shift."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())

    @property
    def num_real_tokens(self) -> int:
        return int((self.segment_ids >= 0).sum())

    def additive_mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The mask as ``(R, 1, L, L)`` floats: 0 where allowed, ``finfo(dtype).min`` elsewhere (for eager attention)."""
        zero = torch.zeros((), dtype=dtype)
        return torch.where(self.attention_mask, zero, torch.finfo(dtype).min)

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a HF causal LM forward (labels excluded: compute the loss yourself)."""
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def gather_last_token(self, values: torch.Tensor) -> torch.Tensor:
        """Pick each example's last-token value from ``values (R, L, ...)`` → ``(N, ...)`` in example order.

        This is how reward/value heads pool a packed batch (the last token of each sequence).
        """
        rows = torch.tensor([r for r, _, _ in self.placements], dtype=torch.long)
        cols = torch.tensor([s + n - 1 for _, s, n in self.placements], dtype=torch.long)
        return values[rows, cols]


def _example_arrays(i: int, ex: Example) -> tuple[list[int], list[int]]:
    """(input_ids, labels) for one example; labels default to every token being a target."""
    if isinstance(ex, Mapping):
        if "input_ids" not in ex:
            raise ValueError(f"example {i}: missing field 'input_ids' (fields: {sorted(ex)})")
        ids = list(ex["input_ids"])
        if "labels" in ex:
            labels = list(ex["labels"])
            if len(labels) != len(ids):
                raise ValueError(
                    f"example {i}: field 'labels' has {len(labels)} entries, 'input_ids' has {len(ids)}"
                )
        elif "completion_mask" in ex:
            mask = list(ex["completion_mask"])
            if len(mask) != len(ids):
                raise ValueError(
                    f"example {i}: field 'completion_mask' has {len(mask)} entries, 'input_ids' has {len(ids)}"
                )
            labels = [t if m else IGNORE_INDEX for t, m in zip(ids, mask, strict=True)]
        else:
            labels = list(ids)
    else:
        ids = list(ex)
        labels = list(ids)
    if not ids:
        raise ValueError(f"example {i}: 'input_ids' is empty")
    return ids, labels


def _assign_rows(lengths: Sequence[int], max_tokens: int, strategy: str) -> list[list[int]]:
    """Bin-pack example indices into rows of capacity ``max_tokens``; longest first, ties by index."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: list[list[int]] = []
    free: list[int] = []
    for i in order:
        n = lengths[i]
        target = -1
        if strategy == "first_fit":
            for r, f in enumerate(free):
                if f >= n:
                    target = r
                    break
        else:  # best_fit: the fullest row that still fits, so big gaps stay open for big examples
            best = max_tokens + 1
            for r, f in enumerate(free):
                if n <= f < best:
                    best, target = f, r
        if target < 0:
            rows.append([])
            free.append(max_tokens)
            target = len(rows) - 1
        rows[target].append(i)
        free[target] -= n
    return rows


def pack_examples(
    examples: Sequence[Example],
    max_tokens: int,
    pad_token_id: int,
    strategy: Literal["first_fit", "best_fit"] = "first_fit",
    pad_to: Literal["longest", "max_tokens"] = "longest",
    pad_to_multiple_of: int = 1,
) -> PackedBatch:
    """Pack ``examples`` into rows of ``max_tokens`` (first-fit- or best-fit-decreasing).

    Each example is a token list (every token a target) or a mapping with ``input_ids`` and either
    ``labels`` (``-100`` = no loss) or ``completion_mask`` (1 = target). Rows are padded to the longest
    row (``pad_to="longest"``) or to ``max_tokens``, rounded up to ``pad_to_multiple_of``.
    An example longer than ``max_tokens`` is an error (truncate before packing).
    """
    if max_tokens <= 0:
        raise ValueError(f"max_tokens must be positive, got {max_tokens}")
    if strategy not in ("first_fit", "best_fit"):
        raise ValueError(f"strategy must be 'first_fit' or 'best_fit', got {strategy!r}")
    if not examples:
        raise ValueError("pack_examples needs at least one example")
    arrays = [_example_arrays(i, ex) for i, ex in enumerate(examples)]
    lengths = [len(ids) for ids, _ in arrays]
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ValueError(
                f"example {i} has {n} tokens, more than max_tokens={max_tokens}; truncate it first"
            )
    rows = _assign_rows(lengths, max_tokens, strategy)
    used = max(sum(lengths[i] for i in row) for row in rows)
    width = max_tokens if pad_to == "max_tokens" else used
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n_rows = len(rows)

    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    segment_ids = torch.full((n_rows, width), -1, dtype=torch.long)
    mask_segments = torch.empty((n_rows, width), dtype=torch.long)
    placements: list[tuple[int, int, int]] = [(0, 0, 0)] * len(examples)
    seq_lens: list[list[int]] = []
    cu = [0]
    for r, row in enumerate(rows):
        start = 0
        row_lens = []
        for k, i in enumerate(row):
            ids, lab = arrays[i]
            n = len(ids)
            input_ids[r, start : start + n] = torch.tensor(ids, dtype=torch.long)
            labels[r, start : start + n] = torch.tensor(lab, dtype=torch.long)
            labels[r, start] = (
                IGNORE_INDEX  # nothing predicts an example's first token (see module docstring)
            )
            position_ids[r, start : start + n] = torch.arange(n)
            segment_ids[r, start : start + n] = k
            mask_segments[r, start : start + n] = k
            placements[i] = (r, start, n)
            row_lens.append(n)
            start += n
            cu.append(r * width + start)
        if start < width:
            # Padding is one extra causal segment: it attends only to itself, never to real tokens.
            position_ids[r, start:] = torch.arange(width - start)
            mask_segments[r, start:] = len(row)
            cu.append((r + 1) * width)
        seq_lens.append(row_lens)

    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same = mask_segments[:, :, None] == mask_segments[:, None, :]  # (R, L, L)
    attention_mask = (same & causal)[:, None]  # (R, 1, L, L)
    return PackedBatch(
        input_ids=input_ids,
        labels=labels,
        position_ids=position_ids,
        attention_mask=attention_mask,
        segment_ids=segment_ids,
        seq_lens=seq_lens,
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        placements=placements,
    )


# ---------------------------------------------------------------------------------------------------------------------
# token-budget batching


class TokenBudgetSampler:
    """Yield batches of example indices whose token cost stays within ``max_tokens``.

    Cost of a batch: ``len(batch) * max(length)`` with ``mode="padded"`` (what a padded batch
    occupies) or ``sum(length)`` with ``mode="packed"`` (what :func:`pack_examples` needs). Each epoch
    shuffles the indices with ``seed`` and the epoch number, sorts windows of ``sort_window`` examples by
    length (so batches hold similar lengths), cuts greedy batches, then shuffles the batch order.

    Iteration yields the remaining batches of the current epoch, then moves to the next epoch.
    ``state_dict()`` / ``load_state_dict()`` capture ``(epoch, position)`` plus a fingerprint of the
    lengths, so resuming with a different dataset fails loudly.
    """

    def __init__(
        self,
        lengths: Sequence[int],
        max_tokens: int,
        seed: int = 0,
        shuffle: bool = True,
        mode: Literal["padded", "packed"] = "padded",
        sort_window: int = 1024,
        max_batch_size: int | None = None,
    ) -> None:
        if max_tokens <= 0:
            raise ValueError(f"max_tokens must be positive, got {max_tokens}")
        if mode not in ("padded", "packed"):
            raise ValueError(f"mode must be 'padded' or 'packed', got {mode!r}")
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1 or len(self.lengths) == 0:
            raise ValueError("lengths must be a non-empty 1-D sequence of token counts")
        too_long = np.nonzero(self.lengths > max_tokens)[0]
        if len(too_long):
            i = int(too_long[0])
            raise ValueError(
                f"example {i} has {int(self.lengths[i])} tokens, more than max_tokens={max_tokens}"
            )
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.mode = mode
        self.sort_window = max(1, sort_window)
        self.max_batch_size = max_batch_size
        self.epoch = 0
        self.position = 0
        self._fingerprint = hashlib.sha256(self.lengths.tobytes()).hexdigest()[:16]
        self._cache: tuple[int, list[list[int]]] | None = None

    def batches_for_epoch(self, epoch: int) -> list[list[int]]:
        """All batches of ``epoch``, a pure function of ``(seed, epoch, lengths)``."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        rng = np.random.default_rng([self.seed, epoch])
        n = len(self.lengths)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        batches: list[list[int]] = []
        for w in range(0, n, self.sort_window):
            window = order[w : w + self.sort_window]
            # Stable sort keeps ties in permutation order, so the result is deterministic.
            window = window[np.argsort(-self.lengths[window], kind="stable")]
            batch: list[int] = []
            longest = total = 0
            for idx in window.tolist():
                n_tok = int(self.lengths[idx])
                new_longest, new_total = max(longest, n_tok), total + n_tok
                cost = new_longest * (len(batch) + 1) if self.mode == "padded" else new_total
                full = self.max_batch_size is not None and len(batch) >= self.max_batch_size
                if batch and (cost > self.max_tokens or full):
                    batches.append(batch)
                    batch, new_longest, new_total = [], n_tok, n_tok
                batch.append(idx)
                longest, total = new_longest, new_total
            if batch:
                batches.append(batch)
        if self.shuffle:
            perm = rng.permutation(len(batches))
            batches = [batches[j] for j in perm]
        self._cache = (epoch, batches)
        return batches

    def batch_cost(self, batch: Sequence[int]) -> int:
        lens = self.lengths[list(batch)]
        return int(lens.max() * len(lens)) if self.mode == "padded" else int(lens.sum())

    def __len__(self) -> int:
        return len(self.batches_for_epoch(self.epoch))

    def __iter__(self) -> Iterator[list[int]]:
        batches = self.batches_for_epoch(self.epoch)
        while self.position < len(batches):
            batch = batches[self.position]
            # Advance before yielding: a state_dict taken after the consumer's step resumes after this batch.
            self.position += 1
            yield batch
        self.epoch += 1
        self.position = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "max_tokens": self.max_tokens,
            "mode": self.mode,
            "lengths_sha256": self._fingerprint,
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for key in ("seed", "max_tokens", "mode"):
            if key in state and state[key] != getattr(self, key):
                raise ValueError(
                    f"sampler state field {key!r}={state[key]!r} does not match this sampler's {getattr(self, key)!r}"
                )
        if state.get("lengths_sha256", self._fingerprint) != self._fingerprint:
            raise ValueError(
                "sampler state field 'lengths_sha256' does not match: the dataset changed since the checkpoint"
            )
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])


# ---------------------------------------------------------------------------------------------------------------------
# prefix-shared packing (one prompt, several continuations)


@dataclass
class TreeBatch:
    """Prefix trees packed into rows: each tree is one prefix followed by ``K`` branches that share it.

    Row layout of a tree: ``[prefix][branch 0][branch 1]...``. A branch token attends to the whole prefix and
    to the earlier tokens of its own branch, never to another branch, and its position id continues from
    the prefix (``P, P+1, ...``), so every branch sees exactly what it would see as the separate sequence
    ``prefix + branch``. The prefix is computed once instead of ``K`` times: a DPO or reward-model pair
    costs ``P + C + R`` token slots instead of ``2 * max(P + C, P + R)`` padded ones, and a GRPO group of
    ``G`` responses ``P + sum(R_g)`` instead of ``G * (P + max R)``.

    Targets are listed flat (``T`` of them, branch-major in branch order): target ``t`` is the token
    ``target_ids[t]`` of branch ``target_branch[t]``, predicted by the hidden state at
    ``(target_rows[t], target_cols[t])`` — the previous token of that branch's sequence, which for a
    branch's first token is the prefix's last token. So log-probs need the LM head only at ``T`` positions.
    Branch ``b`` of tree ``i`` has index ``branch_offsets[i] + b``; ``end_rows/end_cols`` locate each branch's
    last token (reward and value heads pool there).
    """

    input_ids: torch.Tensor  # (R, L) long
    position_ids: torch.Tensor  # (R, L) long
    attention_mask: torch.Tensor  # (R, 1, L, L) bool, True = query may attend to key
    target_rows: torch.Tensor  # (T,) long
    target_cols: torch.Tensor  # (T,) long, the predicting position
    target_ids: torch.Tensor  # (T,) long, the predicted token
    target_branch: torch.Tensor  # (T,) long, global branch index
    target_index: torch.Tensor  # (T,) long, position of the token within its branch
    end_rows: torch.Tensor  # (N,) long, one per branch
    end_cols: torch.Tensor  # (N,) long
    branch_offsets: list[int]  # first global branch index of each tree
    num_branches: int
    num_real_tokens: int

    def model_inputs(self) -> dict[str, torch.Tensor]:
        return {
            "input_ids": self.input_ids,
            "attention_mask": self.attention_mask,
            "position_ids": self.position_ids,
        }

    def to(self, device: torch.device | str) -> TreeBatch:
        moved = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()}
        return TreeBatch(**moved)


def shared_prefix_length(
    a_ids: Sequence[int], a_labels: Sequence[int], b_ids: Sequence[int], b_labels: Sequence[int]
) -> int:
    """Length of the common non-target prefix of two encoded sequences, leaving each at least one token.

    Only tokens that carry no loss on either side are shared (a shared target would have to count for both
    sequences), so for ``[bos] prompt response [eos]`` encodings this is the prompt.
    """
    limit = min(len(a_ids), len(b_ids)) - 1
    n = 0
    while n < limit and a_ids[n] == b_ids[n] and a_labels[n] == IGNORE_INDEX and b_labels[n] == IGNORE_INDEX:
        n += 1
    return n


def pack_prefix_trees(
    trees: Sequence[tuple[Sequence[int], Sequence[tuple[Sequence[int], Sequence[int]]]]],
    pad_token_id: int,
    max_tokens: int | None = None,
    pad_to_multiple_of: int = 1,
) -> TreeBatch:
    """Pack prefix trees into rows (first-fit-decreasing); see :class:`TreeBatch`.

    Args:
        trees: ``(prefix_ids, branches)`` per tree, each branch ``(ids, labels)`` with labels aligned to
            ids (``-100`` = no loss, else the token itself); the prefix carries no loss. A branch may be
            empty only if the prefix is not.
        pad_token_id: id for the padding slots (which form their own causal segment, never attended to).
        max_tokens: row capacity; default the longest tree, so no row is longer than one tree.
        pad_to_multiple_of: round the row width up.
    """
    if not trees:
        raise ValueError("pack_prefix_trees needs at least one tree")
    sizes = []
    for i, (prefix, branches) in enumerate(trees):
        if not branches:
            raise ValueError(f"tree {i} has no branches")
        n = len(prefix)
        for k, (ids, labels) in enumerate(branches):
            if len(ids) != len(labels):
                raise ValueError(f"tree {i} branch {k}: {len(labels)} labels for {len(ids)} tokens")
            if not ids and not prefix:
                raise ValueError(f"tree {i} branch {k}: an empty branch needs a non-empty prefix")
            n += len(ids)
        sizes.append(n)
    width = max(sizes) if max_tokens is None else max_tokens
    if max(sizes) > width:
        raise ValueError(f"a tree has {max(sizes)} tokens, more than max_tokens={width}")
    rows = _assign_rows(sizes, width, "first_fit")
    width = max(sum(sizes[i] for i in row) for row in rows)
    width = -(-width // pad_to_multiple_of) * pad_to_multiple_of
    n_rows = len(rows)

    input_ids = torch.full((n_rows, width), pad_token_id, dtype=torch.long)
    position_ids = torch.zeros((n_rows, width), dtype=torch.long)
    # Attention is allowed iff same tree, causal, and (key in the prefix or key in the query's branch).
    tree_of = torch.full((n_rows, width), -1, dtype=torch.long)
    part_of = torch.full((n_rows, width), -1, dtype=torch.long)  # -1 prefix, k = branch k
    offsets, total_branches = [], 0
    for tree in trees:
        offsets.append(total_branches)
        total_branches += len(tree[1])
    t_rows: list[int] = []
    t_cols: list[int] = []
    t_ids: list[int] = []
    t_branch: list[int] = []
    t_index: list[int] = []
    end_rows = [0] * total_branches
    end_cols = [0] * total_branches
    real = 0
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            prefix, branches = trees[i]
            p = len(prefix)
            input_ids[r, start : start + p] = torch.as_tensor(list(prefix), dtype=torch.long)
            position_ids[r, start : start + p] = torch.arange(p)
            tree_of[r, start : start + p + sizes[i] - p] = i
            pos = start + p
            for k, (ids, labels) in enumerate(branches):
                n = len(ids)
                g = offsets[i] + k
                if n:
                    input_ids[r, pos : pos + n] = torch.as_tensor(list(ids), dtype=torch.long)
                    position_ids[r, pos : pos + n] = torch.arange(p, p + n)
                    part_of[r, pos : pos + n] = k
                prev = start + p - 1  # the token before a branch's first token is the prefix's last
                for j in range(n):
                    if labels[j] != IGNORE_INDEX:
                        t_rows.append(r)
                        t_cols.append(prev)
                        t_ids.append(int(ids[j]))
                        t_branch.append(g)
                        t_index.append(j)
                    prev = pos + j
                end_rows[g], end_cols[g] = r, prev
                pos += n
            real += sizes[i]
            start = pos
        if start < width:
            # Padding is its own causal segment (a fully masked SDPA row would give NaN).
            tree_of[r, start:] = len(trees)
            position_ids[r, start:] = torch.arange(width - start)
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    same_tree = tree_of[:, :, None] == tree_of[:, None, :]
    key_prefix = (part_of == -1)[:, None, :]
    same_part = part_of[:, :, None] == part_of[:, None, :]
    attention_mask = (same_tree & causal & (key_prefix | same_part))[:, None]
    return TreeBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        target_rows=torch.tensor(t_rows, dtype=torch.long),
        target_cols=torch.tensor(t_cols, dtype=torch.long),
        target_ids=torch.tensor(t_ids, dtype=torch.long),
        target_branch=torch.tensor(t_branch, dtype=torch.long),
        target_index=torch.tensor(t_index, dtype=torch.long),
        end_rows=torch.tensor(end_rows, dtype=torch.long),
        end_cols=torch.tensor(end_cols, dtype=torch.long),
        branch_offsets=offsets,
        num_branches=total_branches,
        num_real_tokens=real,
    )
