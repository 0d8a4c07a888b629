"""``hf:MODEL_DIR``: a local causal LM as a judge, read from its next-token distribution (no sampling).

``MODEL_DIR`` is a HF causal-LM folder, or (with a store) a policy/checkpoint artifact. The prompt is a
template file (``template=PATH``; default the shipped ``pairwise.txt`` / ``rubric.txt``, which users copy
and edit), rendered with the item and with its trailing whitespace removed (editors add a newline); the
answer is read at the position right after it, as if the model went on with one space and the answer (or
with the answer directly when the tokenizer would give " A" and " B" the same first token, "Ġ").

- ``mode=pairwise`` (default): render ``{prompt}``, ``{a}``, ``{b}``; the log-probabilities of the first
  token of " A" and of " B" (``verdicts=A/B`` to change the words) are compared: P(A) = softmax over the two,
  the winner is the likelier, ``confidence`` = max(P(A), P(B)), ``scores`` = the two log-probabilities under
  the full vocabulary. The verdict tokens are found by encoding the template's constant tail followed by each
  answer, so tokenizers that merge the space into the word (" A" ≠ "A") are handled.
- ``mode=rubric``: render ``{prompt}``, ``{response}``; the score is the expectation of k under the next-token
  distribution restricted to the tokens " 1" … " 9" and " 10" (renormalised over them), in [1, 10]. When the
  tokenizer has no single first token for " 10" distinct from " 1" (it splits "10" into "1" "0"), the scale
  is 1–9: reading the "0" would need a second pass, and counting " 1" as both 1 and 10 would bias it.
  Rubric mode scores single responses (``alignflow eval --scorer judge:hf:DIR#mode=rubric``) and judges any
  number of candidates by comparing their scores.

Inputs are batched (``batch_size``, default 8) with left padding and position ids counted from each row's
first real token, so a batch gives the same numbers as one item at a time (up to float rounding). An input
longer than ``max_length`` tokens (default: the model's maximum positions) loses tokens from its start: the
end, where the verdict is asked for, is what the model must see.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch

from alignflow.judges.base import BaseJudge, JudgeError, Verdict, register_backend
from alignflow.judges.rm import resolve_folder
from alignflow.judges.templates import Template, load_template

log = logging.getLogger(__name__)


def answer_token(tokenizer: Any, tail: str, answer: str) -> int:
    """The id of the first token the model would emit for ``answer`` right after ``tail`` (the template's
    constant end): the first token of the encoding of ``tail + answer`` past ``tail``'s own, or, when the
    boundary merges into ``tail``'s last token, of ``answer`` alone."""
    base = tokenizer(tail, add_special_tokens=False).input_ids
    full = tokenizer(tail + answer, add_special_tokens=False).input_ids
    if len(full) > len(base) and full[: len(base)] == base:
        return int(full[len(base)])
    alone = tokenizer(answer, add_special_tokens=False).input_ids
    if not alone:
        raise JudgeError(f"the tokenizer encodes {answer!r} as nothing")
    return int(alone[0])


def answer_tokens(tokenizer: Any, tail: str, answers: Sequence[str]) -> tuple[list[int], str]:
    """First-token ids of ``answers`` after ``tail`` and the separator used: one space (" A", as most
    tokenizers fold the space into the word), or none when that gives two answers one first token (a small
    byte-level vocabulary encodes " A" as "Ġ" "A", so " A" and " B" would both start with "Ġ")."""
    for sep in (" ", ""):
        ids = [answer_token(tokenizer, tail, sep + a) for a in answers]
        if len(set(ids)) == len(ids):
            return ids, sep
    raise JudgeError(f"the tokenizer gives no distinct first tokens to the answers {list(answers)}")


class CausalLMJudge(BaseJudge):
    def __init__(
        self,
        spec: str,
        model: Any,
        tokenizer: Any,
        template: Template,
        mode: str,
        *,
        verdicts: tuple[str, str] = ("A", "B"),
        max_length: int | None = None,
        batch_size: int = 8,
        artifact_id: str | None = None,
    ) -> None:
        self.spec, self.model, self.tokenizer = spec, model, tokenizer
        self.template, self.mode, self.artifact_id = template, mode, artifact_id
        self.batch_size = batch_size
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(
            model.config, "n_positions", None
        )
        self.max_length = max_length or limit or 1024
        self.device = next(model.parameters()).device
        tail = template.tail
        try:
            if mode == "pairwise":
                self.verdicts = verdicts
                self.verdict_ids, self.sep = answer_tokens(tokenizer, tail, verdicts)
            else:
                self.rating_ids, self.sep = answer_tokens(tokenizer, tail, [str(k) for k in range(1, 10)])
                self.rating_values = list(range(1, 10))
                ten = answer_token(tokenizer, tail, self.sep + "10")
                if ten not in self.rating_ids:  # else "10" begins with the token of "1": a 1–9 scale
                    self.rating_ids, self.rating_values = [*self.rating_ids, ten], [*self.rating_values, 10]
        except JudgeError as exc:
            raise JudgeError(f"judge {spec!r}: {exc}") from None

    # -------------------------------------------------------------------------------- the forward pass

    def next_token_logprobs(self, texts: Sequence[str]) -> torch.Tensor:
        """``(N, V)`` float32 log-probabilities of the token after each text (templates already rendered)."""
        out = []
        self._cut = 0
        for start in range(0, len(texts), self.batch_size):
            out.append(self._forward(texts[start : start + self.batch_size]))
        if self._cut:  # one warning per call, not one per batch
            log.warning(
                "judge %s: %d of %d input(s) longer than %d tokens lose their start",
                self.spec,
                self._cut,
                len(texts),
                self.max_length,
            )
        return torch.cat(out) if out else torch.zeros(0, 0)

    @torch.no_grad()
    def _forward(self, texts: Sequence[str]) -> torch.Tensor:
        tok = self.tokenizer
        rows = [tok(t, add_special_tokens=True).input_ids for t in texts]
        self._cut = getattr(self, "_cut", 0) + sum(len(r) > self.max_length for r in rows)
        rows = [r[-self.max_length :] for r in rows]
        width = max(len(r) for r in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last real token is at -1
            ids[i, width - len(r) :] = torch.tensor(r)
            mask[i, width - len(r) :] = 1
        # Positions from each row's first real token, so padding shifts nothing (GPT-2's absolute positions
        # and Llama's rotary ones both read position_ids).
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
        ).logits[:, -1, :]
        return torch.log_softmax(logits.float(), dim=-1).cpu()  # (B, V)

    def _render_pair(self, prompt: str, a: str, b: str) -> str:
        return self.template.render(prompt=prompt, a=a, b=b).rstrip()

    def _render_one(self, prompt: str, response: str) -> str:
        return self.template.render(prompt=prompt, response=response).rstrip()

    # -------------------------------------------------------------------------------- verdicts and scores

    def ratings(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        """Rubric mode: the expected 1–10 rating of each response."""
        lp = self.next_token_logprobs(
            [self._render_one(p, r) for p, r in zip(prompts, responses, strict=True)]
        )
        if not len(lp):
            return []
        probs = torch.softmax(lp[:, self.rating_ids].double(), dim=-1)  # (N, K), renormalised over the digits
        values = torch.tensor(self.rating_values, dtype=torch.float64)
        return (probs @ values).tolist()

    def judge_many(self, items: Sequence[tuple[str, Sequence[str]]]) -> list[Verdict]:
        for i, (_, cands) in enumerate(items):
            if not cands or (self.mode == "pairwise" and len(cands) != 2):
                raise JudgeError(
                    f"judge {self.spec!r}: item {i}: a pairwise judge compares 2 candidates, got {len(cands)}"
                    + ("" if self.mode == "pairwise" else "; a rubric judge needs at least 1")
                )
        if self.mode == "rubric":
            scores = iter(self.ratings([p for p, c in items for _ in c], [x for _, c in items for x in c]))
            return [Verdict.from_scores([next(scores) for _ in cands]) for _, cands in items]
        lp = self.next_token_logprobs([self._render_pair(p, c[0], c[1]) for p, c in items])
        out = []
        for row in lp:
            la, lb = float(row[self.verdict_ids[0]]), float(row[self.verdict_ids[1]])
            if not (math.isfinite(la) and math.isfinite(lb)):
                raise JudgeError(f"judge {self.spec!r}: the model gives the verdict tokens no probability")
            p_a = 1.0 / (1.0 + math.exp(lb - la))  # softmax over the two verdict tokens
            v = Verdict.from_scores([la, lb], confidence=max(p_a, 1.0 - p_a))
            out.append(v if v.winner is not None else Verdict(None, v.ranking, v.scores, 0.5))
        return out

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        if self.mode != "rubric":
            raise JudgeError(
                f"judge {self.spec!r} compares pairs; it cannot score one response on its own "
                "(use mode=rubric after '#' in the spec)"
            )
        return self.ratings(prompts, responses)

    @property
    def pointwise(self) -> bool:
        return self.mode == "rubric"

    def describe(self) -> dict[str, Any]:
        return {
            "backend": "hf",
            "model": self.artifact_id,
            "mode": self.mode,
            "template": self.template.source,
            "template_sha256": self.template.sha256,
        }


_OPTIONS = ("template", "mode", "max_length", "batch_size", "verdicts")


def _positive_int(options: dict[str, Any], key: str, spec: str) -> int | None:
    raw = options.get(key)
    if raw is None:
        return None
    try:
        value = int(str(raw))
    except ValueError:
        raise JudgeError(f"judge {spec!r}: option {key}={raw!r}: expected a whole number") from None
    if value < 1:
        raise JudgeError(f"judge {spec!r}: option {key}={value}: must be ≥ 1")
    return value


def _build(rest: str, store: Any, device: str, options: dict[str, Any]) -> CausalLMJudge:
    from alignflow.models import load_policy, load_tokenizer

    spec = f"hf:{rest}"
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise JudgeError(f"judge {spec!r}: unknown option(s) {unknown}; known: {list(_OPTIONS)}")
    mode = str(options.get("mode", "pairwise"))
    template = load_template(options.get("template"), mode, spec)
    verdicts = tuple(str(options.get("verdicts", "A/B")).split("/"))
    if len(verdicts) != 2 or not all(v.strip() for v in verdicts):
        raise JudgeError(
            f"judge {spec!r}: option verdicts={options['verdicts']!r}: expected two words as A/B"
        )
    path, aid = resolve_folder(rest, store, spec)
    tokenizer = load_tokenizer(path, padding_side="left")
    model = load_policy(path, dtype="float32", device=device).eval().requires_grad_(False)
    return CausalLMJudge(
        spec,
        model,
        tokenizer,
        template,
        mode,
        verdicts=(verdicts[0].strip(), verdicts[1].strip()),
        max_length=_positive_int(options, "max_length", spec),
        batch_size=_positive_int(options, "batch_size", spec) or 8,
        artifact_id=aid,
    )


register_backend("hf", _build)
