"""Prompt extraction, the one BOS rule, left padding and the resumable prompt stream (``alignflow.data.prompts``)."""

from __future__ import annotations

import pytest
import torch

from alignflow.data.encode import SequenceEncoder, sft_prompt_key
from alignflow.data.prompts import (
    Prompt,
    PromptStream,
    bos_prefix,
    encode_prompt,
    left_pad,
    prompts_from_rows,
)
from alignflow.errors import DataFormatError


def test_prompts_from_rows_renders_messages_dedups_and_keeps_order(tok):
    rows = [
        {"id": "a", "prompt": "What is 2+2? "},
        {"id": "b", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]},
        {"id": "c", "prompt": "What is 2+2? "},  # a duplicate: kept once, where it first appeared
        {"id": "d", "messages": [{"role": "user", "content": "hi"}]},  # no final assistant turn: same prompt
    ]
    got = prompts_from_rows(rows, "sft", tok, "toy.jsonl")
    templated = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert [(p.text, p.templated) for p in got] == [("What is 2+2? ", False), (templated, True)]
    # The split key is SFT's for the same row, so both stages hold out the same prompts.
    assert [p.key for p in got] == [sft_prompt_key(rows[0]), sft_prompt_key(rows[1])]
    one_turn = prompts_from_rows([{"id": "u", "messages": rows[3]["messages"]}], "sft", tok, "s")[0]
    assert one_turn.key != sft_prompt_key(rows[3])  # SFT's key would drop the only turn: every such row alike
    # kind "pairs" reads only the prompt column
    assert prompts_from_rows(
        [{"id": "p", "prompt": "x", "messages": rows[1]["messages"]}], "pairs", tok, "s"
    ) == [Prompt("x")]
    with pytest.raises(DataFormatError, match=r"toy.jsonl: row 1 \(id e\): field 'prompt' is empty"):
        prompts_from_rows([rows[0], {"id": "e", "prompt": ""}], "sft", tok, "toy.jsonl")


def test_one_bos_rule_shared_with_the_sft_encoder(tok):
    """Plain text: bos first, exactly as SequenceEncoder.encode; templated text: nothing added (the template
    wrote it), as SequenceEncoder.encode_messages; the END of a long prompt is kept."""
    assert tok.bos_token_id is not None
    plain = encode_prompt(tok, "What is 2+2? ")
    sft = SequenceEncoder(tok, max_length=64).encode("What is 2+2? ", "4").input_ids
    assert plain[0] == tok.bos_token_id and sft[: len(plain)] == plain
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    ids = encode_prompt(tok, text, templated=True)
    assert ids == list(tok(text, add_special_tokens=False)["input_ids"])
    assert ids.count(tok.bos_token_id) == 1  # the template's own bos, not a second one
    assert encode_prompt(tok, "What is 2+2? ", max_length=3) == plain[-3:]
    assert bos_prefix(tok, templated=True) == []

    class NoBos:
        bos_token_id = None

    assert bos_prefix(NoBos()) == []


def test_left_pad_right_aligns_rows():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_token_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


def test_prompt_stream_covers_each_epoch_and_resumes_exactly():
    stream = PromptStream(5, seed=3)
    first = stream.take(5)
    assert sorted(first) == list(range(5))  # one epoch is a permutation
    stream.take(2)
    state = stream.state_dict()
    expected = stream.take(7)  # crosses into the third epoch
    resumed = PromptStream(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.take(7) == expected
    assert PromptStream(5, seed=4).take(5) != first or PromptStream(5, seed=5).take(5) != first
    with pytest.raises(ValueError, match="at least one prompt"):
        PromptStream(0, seed=0)
