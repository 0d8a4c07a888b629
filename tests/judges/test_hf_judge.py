"""``hf:MODEL_DIR`` judges on a tiny Llama and a tiny GPT-2 (absolute positions, so left padding must be
undone by position ids): verdicts equal the argmax of the verdict tokens' log-probabilities from a direct,
unpadded forward pass; rubric scores are the expected digit; batches equal one-at-a-time; user templates are
read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from alignflow.judges import JudgeError, judge_pairs, load_judge
from alignflow.judges.templates import load_template

PAIRS = [
    ("How do I reset my password?", "Click 'forgot password' on the login page.", "No."),
    ("What is 2 + 2?", "4", "It is four, because two and two make four, as everyone learns at school."),
    ("Say hi.", "hi there friend", "hello"),
]


@pytest.fixture(autouse=True)
def _one_thread():
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from transformers import GPT2Config, GPT2LMHeadModel

    from alignflow.models import default_corpus, make_tiny_model_dir, train_bpe_tokenizer

    root = tmp_path_factory.mktemp("lms")
    llama = make_tiny_model_dir(root / "llama", vocab_size=400, hidden_size=32, max_position_embeddings=1024)
    gpt2 = root / "gpt2"
    tok = train_bpe_tokenizer(default_corpus(seed=1), 400)
    torch.manual_seed(3)
    cfg = GPT2Config(
        vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=1024,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    GPT2LMHeadModel(cfg).save_pretrained(str(gpt2))
    tok.save_pretrained(str(gpt2))
    return {"llama": llama, "gpt2": gpt2}


def _direct_next_logprobs(folder: Path, text: str) -> torch.Tensor:
    """One unpadded forward pass of the raw model: log-probabilities of the token after ``text``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = torch.tensor([tok(text).input_ids])
    with torch.no_grad():
        return torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_pairwise_verdicts_are_the_argmax_of_the_verdict_token_logprobs(models, arch: str) -> None:
    from transformers import AutoTokenizer

    judge = load_judge(f"hf:{models[arch]}")
    tok = AutoTokenizer.from_pretrained(models[arch])
    # This small byte-level vocabulary encodes " A" as "Ġ" "A": the judge must read "A" / "B" themselves.
    assert (
        tok(" A", add_special_tokens=False).input_ids[0] == tok(" B", add_special_tokens=False).input_ids[0]
    )
    a_id, b_id = tok.convert_tokens_to_ids("A"), tok.convert_tokens_to_ids("B")
    assert judge.verdict_ids == [a_id, b_id]
    template = load_template(None, "pairwise", "test")
    verdicts = judge.judge_many([(p, (a, b)) for p, a, b in PAIRS])
    for (p, a, b), v in zip(PAIRS, verdicts, strict=True):
        lp = _direct_next_logprobs(models[arch], template.render(prompt=p, a=a, b=b).rstrip())
        la, lb = float(lp[a_id]), float(lp[b_id])
        assert v.scores == pytest.approx((la, lb), abs=1e-5)
        assert v.winner == (0 if la > lb else 1)
        assert v.confidence == pytest.approx(float(torch.softmax(torch.tensor([la, lb]), 0).max()), abs=1e-6)
    assert all(pv.consistent is not None for pv in judge_pairs(judge, PAIRS))
    assert not judge.pointwise
    with pytest.raises(JudgeError, match="compares pairs; it cannot score one response"):
        judge.score(["q"], ["a"])


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_rubric_scores_are_the_expected_digit_and_batches_equal_single_items(models, arch: str) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models[arch])
    judge = load_judge(f"hf:{models[arch]}#mode=rubric,batch_size=8")
    one = load_judge(f"hf:{models[arch]}#mode=rubric,batch_size=1")
    assert judge.pointwise
    # "10" is "1" "0" in this vocabulary, so the scale is 1-9 (see alignflow.judges.hf)
    assert judge.rating_values == list(range(1, 10))
    digits = [tok.convert_tokens_to_ids(str(k)) for k in range(1, 10)]
    assert judge.rating_ids == digits
    prompts = [p for p, _, _ in PAIRS] + ["x"]
    responses = [a for _, a, _ in PAIRS] + ["a much longer response than the others, to force padding " * 3]
    batched, single = judge.score(prompts, responses), one.score(prompts, responses)
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(1.0 <= s <= 10.0 for s in batched) and len({round(s, 6) for s in batched}) > 1
    template = load_template(None, "rubric", "test")
    lp = _direct_next_logprobs(
        models[arch], template.render(prompt=prompts[0], response=responses[0]).rstrip()
    )
    probs = torch.softmax(lp[digits].double(), 0)
    assert batched[0] == pytest.approx(
        float((probs * torch.arange(1, 10, dtype=torch.float64)).sum()), abs=1e-5
    )
    # pairwise in rubric mode compares the two scores
    v = judge.judge(prompts[0], [responses[0], responses[3]])
    assert v.scores == pytest.approx(judge.score([prompts[0]] * 2, [responses[0], responses[3]]), abs=1e-5)
    # pairwise batching, with candidates of very different lengths
    pw, pw1 = load_judge(f"hf:{models[arch]}"), load_judge(f"hf:{models[arch]}#batch_size=1")
    items = [(p, (a, b)) for p, a, b in PAIRS]
    for x, y in zip(pw.judge_many(items), pw1.judge_many(items), strict=True):
        assert x.scores == pytest.approx(y.scores, abs=1e-5)


def test_a_user_template_is_used_and_checked(models, tmp_path: Path) -> None:
    mine = tmp_path / "judge.txt"
    mine.write_text("Question: {prompt}\nFirst: {a}\nSecond: {b}\nThe better one is\n")
    default = load_judge(f"hf:{models['llama']}")
    custom = load_judge(f"hf:{models['llama']}#template={mine}")
    assert custom.template.source == str(mine)
    item = [(PAIRS[0][0], PAIRS[0][1:])]
    assert default.judge_many(item)[0].scores != pytest.approx(custom.judge_many(item)[0].scores, abs=1e-4)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["llama"])
    text = (
        mine.read_text()
        .replace("{prompt}", PAIRS[0][0])
        .replace("{a}", PAIRS[0][1])
        .replace("{b}", PAIRS[0][2])
    )
    lp = _direct_next_logprobs(models["llama"], text.rstrip())
    ids = custom.verdict_ids
    assert custom.judge_many(item)[0].scores == pytest.approx(
        (float(lp[ids[0]]), float(lp[ids[1]])), abs=1e-5
    )
    assert tok.convert_ids_to_tokens(ids)[0] in ("A", "ĠA")
    bad = tmp_path / "bad.txt"
    bad.write_text("Rate {response}\n")
    with pytest.raises(JudgeError, match=r"bad.txt'.*needs the placeholder\(s\) \{prompt\}"):
        load_judge(f"hf:{models['llama']}#mode=rubric,template={bad}")
    with pytest.raises(JudgeError, match=r"needs the placeholder\(s\) \{prompt\}, \{a\}, \{b\}"):
        load_judge(f"hf:{models['llama']}#template={bad}")
    with pytest.raises(JudgeError, match=r"unknown option\(s\) \['modes'\]"):
        load_judge(f"hf:{models['llama']}#modes=rubric")
    with pytest.raises(JudgeError, match="mode must be one of"):
        load_judge(f"hf:{models['llama']}#mode=score")
