"""Model loading: clear errors, dtype resolution, reward/value heads, LoRA reference mode."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from alignflow.models import (
    CausalLMWithValueHead,
    LoraSpec,
    ModelLoadError,
    load_policy,
    load_reference,
    load_reward_model,
    load_tokenizer,
    load_value_model,
    reference_mode,
    resolve_dtype,
    tiny_llama,
)


def _ids(tiny_dir: Path) -> torch.Tensor:
    tok = load_tokenizer(tiny_dir)
    return torch.tensor([tok("the model answered a short poem politely.")["input_ids"]])


def test_policy_loads_and_matches_saved_weights(tiny_dir: Path) -> None:
    from safetensors.torch import load_file

    model = load_policy(tiny_dir, dtype="float32")
    saved = load_file(str(tiny_dir / "model.safetensors"))
    for name, p in model.state_dict().items():
        assert torch.equal(p, saved[name]), name
    assert model.config._attn_implementation == "sdpa"
    assert model.training
    ref = load_reference(tiny_dir, dtype="float32")
    assert not ref.training and not any(p.requires_grad for p in ref.parameters())


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"does not exist.*never downloaded") as e:
        load_policy(tmp_path / "absent")
    assert str(tmp_path / "absent") in str(e.value)


def test_missing_weights_file(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "noweights"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="has no weights file") as e:
        load_policy(d)
    assert str(d) in str(e.value) and "re-save" in str(e.value)


def test_unknown_architecture(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "unknown"
    shutil.copytree(tiny_dir, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llamazilla"
    (d / "config.json").write_text(json.dumps(cfg))
    for loader in (load_policy, load_reward_model, load_value_model):
        with pytest.raises(ModelLoadError, match="unknown architecture model_type='llamazilla'") as e:
            loader(d)
        assert str(d / "config.json") in str(e.value)


def test_corrupt_weights_file_is_a_clean_error(tiny_dir: Path, tmp_path: Path) -> None:
    d = tmp_path / "corrupt"
    shutil.copytree(tiny_dir, d)
    (d / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ModelLoadError, match=str(d)):
        load_policy(d, dtype="float32")


def test_dtype_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    import alignflow.models.loading as loading

    assert resolve_dtype("float32") is torch.float32
    assert resolve_dtype("bfloat16") is torch.bfloat16
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") is torch.float32
    monkeypatch.setattr(loading, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8")  # type: ignore[arg-type]


def test_reward_model_scalar_head(tiny_dir: Path) -> None:
    tok = load_tokenizer(tiny_dir)
    rm = load_reward_model(tiny_dir, dtype="float32")
    assert rm.config.num_labels == 1 and rm.config.pad_token_id == tok.pad_token_id
    batch = tok(["a short one", "a rather longer sentence than the first"], padding=True, return_tensors="pt")
    out = rm(**batch).logits
    assert out.shape == (2, 1)
    # Right padding must not change the score: the head pools the last non-pad token.
    alone = rm(**tok(["a short one"], return_tensors="pt")).logits
    torch.testing.assert_close(out[0], alone[0], atol=1e-5, rtol=1e-5)


def test_value_model_options(tiny_dir: Path) -> None:
    ids = _ids(tiny_dir)
    separate = load_value_model(tiny_dir, dtype="float32")
    assert separate.config.num_labels == 1
    shared = load_value_model(tiny_dir, dtype="float32", shared_trunk=True)
    assert isinstance(shared, CausalLMWithValueHead)
    logits, values = shared(ids)
    assert logits.shape == (1, ids.shape[1], shared.lm.config.vocab_size)
    assert values.shape == ids.shape and torch.all(values == 0)  # zero-initialised head
    values.sum().backward()
    assert shared.value_head.summary.weight.grad is not None


def test_lora_reference_mode_equals_base_without_second_copy(tiny_dir: Path) -> None:
    ids = _ids(tiny_dir)
    base = load_policy(tiny_dir, dtype="float32").eval()
    with torch.no_grad():
        base_logits = base(ids).logits
    policy = load_policy(tiny_dir, dtype="float32", lora=LoraSpec(r=4, alpha=8))
    policy.eval()
    # Move the adapters away from their zero init so policy and reference really differ.
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        lora_logits = policy(ids).logits
        n_before = sum(1 for _ in policy.parameters())
        ptrs_before = {p.data_ptr() for p in policy.parameters()}
        with reference_mode(policy) as ref:
            assert ref is policy
            ref_logits = ref(ids).logits
            assert sum(1 for _ in policy.parameters()) == n_before
            assert {p.data_ptr() for p in policy.parameters()} == ptrs_before
        after_logits = policy(ids).logits
    assert not torch.allclose(lora_logits, base_logits, atol=1e-3)
    torch.testing.assert_close(ref_logits, base_logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(after_logits, lora_logits, atol=0, rtol=0)  # adapters back on
    # Only the LoRA matrices train; the base weights are shared, frozen, and held once.
    trainable = [n for n, p in policy.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    base_numel = sum(p.numel() for p in base.parameters())
    frozen_numel = sum(p.numel() for p in policy.parameters() if not p.requires_grad)
    assert frozen_numel == base_numel


def test_reference_mode_rejects_plain_model() -> None:
    with pytest.raises(TypeError, match="needs a peft.PeftModel"), reference_mode(tiny_llama(vocab_size=50)):
        pass


def test_lora_adapter_round_trip(tiny_dir: Path, tmp_path: Path) -> None:
    ids = _ids(tiny_dir)
    policy = load_policy(tiny_dir, dtype="float32", lora=LoraSpec(r=4, alpha=8)).eval()
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
        expected = policy(ids).logits
    policy.save_pretrained(str(tmp_path / "adapter"))
    again = load_policy(tiny_dir, dtype="float32", lora=LoraSpec(adapter_path=tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits, expected, atol=0, rtol=0)
    with pytest.raises(ModelLoadError, match="adapter_config.json"):
        load_policy(tiny_dir, dtype="float32", lora=LoraSpec(adapter_path=tmp_path / "missing"))


def test_gradient_checkpointing_same_gradients(tiny_dir: Path) -> None:
    ids = _ids(tiny_dir)
    grads = []
    for gc in (False, True):
        m = load_policy(tiny_dir, dtype="float32", gradient_checkpointing=gc)
        m(ids, labels=ids).loss.backward()
        grads.append(m.model.embed_tokens.weight.grad)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
