"""Prompts for on-policy training and sampling: text from dataset rows, token ids, left padding, a stream.

BOS rule (one rule for every causal encoding in alignflow, :func:`bos_prefix`): plain text starts with the
tokenizer's ``bos`` when it has one; chat-templated text gets nothing added, because the template writes
its own special tokens. :class:`~alignflow.data.encode.SequenceEncoder` uses the same function, so a prompt
is tokenised the same way for SFT and for the PPO rollouts that follow it.

Prompts are kept from the END when too long (the end, next to the response, is what matters), as the
encoder's truncation rule does.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from alignflow.errors import DataFormatError


@dataclass(frozen=True)
class Prompt:
    """One prompt: its text, whether a chat template rendered it (then it carries its own special tokens),
    and ``key``, what :func:`alignflow.data.encode.split_by_prompt` hashes (SFT's key for the same row, so a
    prompt SFT held out is held out here too); ``key`` defaults to the text."""

    text: str
    templated: bool = False
    key: str = ""

    def __post_init__(self) -> None:
        if not self.key:
            object.__setattr__(self, "key", self.text)


def bos_prefix(tok: Any, templated: bool = False) -> list[int]:
    """``[bos]`` before plain text when the tokenizer has a bos token; ``[]`` before chat-templated text."""
    if templated or tok.bos_token_id is None:
        return []
    return [tok.bos_token_id]


def prompts_from_rows(rows: Sequence[Mapping[str, Any]], kind: str, tok: Any, source: str) -> list[Prompt]:
    """The unique prompts of dataset rows, in order of first appearance.

    ``kind="sft"`` or ``"prompts"``: a row's ``messages`` minus a final assistant turn, rendered with the
    tokenizer's chat template (generation prompt added), or else its ``prompt``; ``kind="pairs"``: the ``prompt``.
    ``source`` names the dataset in error messages. A ``messages`` prompt's ``key`` is its turns as JSON,
    SFT's split key (:func:`alignflow.data.encode.sft_prompt_key`) when the row ends with the assistant turn.
    """
    out: dict[str, Prompt] = {}
    for i, row in enumerate(rows):
        if kind in ("sft", "prompts") and row.get("messages"):
            if tok.chat_template is None:
                raise DataFormatError(
                    f"{source}: row {i} (id {row.get('id')}): field 'messages' needs a tokenizer chat_template"
                )
            turns = list(row["messages"])
            if turns[-1]["role"] == "assistant":
                turns = turns[:-1]  # the reply to learn; the policy writes its own
            msgs = [dict(m) for m in turns]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            out.setdefault(text, Prompt(text, templated=True, key=json.dumps(turns, sort_keys=True)))
        else:
            text = row.get("prompt")
            if not text:
                raise DataFormatError(f"{source}: row {i} (id {row.get('id')}): field 'prompt' is empty")
            out.setdefault(text, Prompt(text))
    return list(out.values())


def encode_prompt(tok: Any, text: str, max_length: int | None = None, templated: bool = False) -> list[int]:
    """Token ids of one prompt under :func:`bos_prefix`'s rule; the last ``max_length`` ids when given."""
    ids = [*bos_prefix(tok, templated), *tok(text, add_special_tokens=False)["input_ids"]]
    return ids[-max_length:] if max_length else ids


def left_pad(
    seqs: Sequence[Sequence[int]], pad_token_id: int, device: torch.device | str
) -> tuple[Tensor, Tensor]:
    """``(ids, mask)``, both ``(B, P)`` int64 with ``P`` the longest sequence: sequences right-aligned, pad
    and mask 0 on the left (the layout :func:`alignflow.rollout.sample` generates from)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(list(s), dtype=torch.long)
        mask[i, width - len(s) :] = 1
    return ids.to(device), mask.to(device)


class PromptStream:
    """Seeded epoch-wise shuffling of ``n`` prompt indices; ``state_dict`` is the exact position for resume.

    Each epoch is a fresh permutation seeded by ``(seed, epoch)``, so a resumed stream continues with the
    same indices an uninterrupted one would have drawn.
    """

    def __init__(self, n: int, seed: int) -> None:
        if n <= 0:
            raise ValueError(f"PromptStream needs at least one prompt, got n={n}")
        self.n, self.seed, self.epoch, self.pos = n, seed, 0, 0
        self._perm = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.RandomState((self.seed + 7919 * self.epoch) % 2**32).permutation(self.n)

    def take(self, k: int) -> list[int]:
        """The next ``k`` indices, crossing into the next epoch when this one runs out."""
        out = []
        while len(out) < k:
            if self.pos == self.n:
                self.epoch, self.pos = self.epoch + 1, 0
                self._perm = self._permutation()
            out.append(int(self._perm[self.pos]))
            self.pos += 1
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.epoch, self.pos = int(state["epoch"]), int(state["pos"])
        self._perm = self._permutation()


__all__ = ["Prompt", "PromptStream", "bos_prefix", "encode_prompt", "left_pad", "prompts_from_rows"]
