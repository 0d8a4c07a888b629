"""generate_candidates: greedy equals HF generate, layout of the n completions, seeding, post-processing."""

from __future__ import annotations

import torch

from alignflow.data.prompts import Prompt, encode_prompt, left_pad
from alignflow.rollout.candidates import generate_candidates

PROMPTS = ["Hello there", "The model wrote a short poem carefully.", "x", "Item 42 costs $3.50 today, why?"]


def _hf_greedy(model, tok, prompts: list[str], max_new_tokens: int) -> list[str]:
    ids, mask = left_pad([encode_prompt(tok, p) for p in prompts], tok.pad_token_id, "cpu")
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    return tok.batch_decode(gen[:, ids.shape[1] :], skip_special_tokens=True)


def test_greedy_matches_hf_generate(model, tok):
    got = generate_candidates(model, tok, PROMPTS, n=1, temperature=0, max_new_tokens=12, batch_size=4)
    assert [c[0] for c in got] == _hf_greedy(model, tok, PROMPTS, 12)


def test_model_directory_and_loaded_model_agree(model, tok, tiny_dir):
    from_dir = generate_candidates(tiny_dir, None, PROMPTS[:2], temperature=0, max_new_tokens=8)
    loaded = generate_candidates(model, tok, PROMPTS[:2], temperature=0, max_new_tokens=8)
    assert from_dir == loaded


def test_n_completions_per_prompt_in_prompt_order_and_seeded(model, tok):
    done: list[int] = []
    a = generate_candidates(
        model,
        tok,
        PROMPTS,
        n=3,
        temperature=1.0,
        max_new_tokens=6,
        seed=7,
        batch_size=5,
        progress=done.append,
    )
    assert [len(c) for c in a] == [3, 3, 3, 3]
    assert done == [5, 5, 2]  # 12 completions in batches of 5
    assert generate_candidates(model, tok, PROMPTS, n=3, max_new_tokens=6, seed=7, batch_size=5) == a
    other = generate_candidates(model, tok, PROMPTS, n=3, max_new_tokens=6, seed=8, batch_size=5)
    assert other != a
    greedy = generate_candidates(model, tok, PROMPTS, n=2, temperature=0, max_new_tokens=6)
    assert all(c[0] == c[1] for c in greedy)


def test_postprocess_is_applied_to_every_completion(model, tok):
    raw = generate_candidates(model, tok, PROMPTS, n=2, temperature=0, max_new_tokens=6)
    cut = generate_candidates(
        model, tok, PROMPTS, n=2, temperature=0, max_new_tokens=6, postprocess=lambda t: t[:3].upper()
    )
    assert cut == [[t[:3].upper() for t in c] for c in raw]


def test_model_mode_is_restored(model, tok):
    model.train()
    try:
        generate_candidates(model, tok, PROMPTS[:1], temperature=0, max_new_tokens=2)
        assert model.training
    finally:
        model.eval()


def test_templated_prompts_get_no_second_bos(model, tok):
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    got = generate_candidates(model, tok, [Prompt(text, templated=True)], temperature=0, max_new_tokens=6)
    ids, mask = left_pad([encode_prompt(tok, text, templated=True)], tok.pad_token_id, "cpu")
    assert ids[0].tolist().count(tok.bos_token_id) == 1
    with torch.no_grad():
        gen = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=6,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        )
    assert got == [[tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True)]]


def test_a_sampled_nul_byte_comes_back_as_the_replacement_character(tiny_dir, tok):
    # A byte-level tokenizer has a token for byte 0; the annotation platform (and PostgreSQL text) refuse NUL.
    from alignflow.models import load_policy

    nul = next(i for i in range(len(tok)) if tok.decode([i]) == "\x00")
    model = load_policy(tiny_dir, dtype="float32").eval()
    head = torch.nn.Linear(model.lm_head.in_features, model.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[nul] = 10.0  # every step's greedy token is byte 0
    model.lm_head = head
    got = generate_candidates(model, tok, PROMPTS[:2], temperature=0, max_new_tokens=3)
    assert got == [["\ufffd" * 3], ["\ufffd" * 3]]
