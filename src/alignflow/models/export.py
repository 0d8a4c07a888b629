"""Writing a trained model back out as a normal Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from alignflow.models.loading import quiet_transformers_progress


def export_hf(model: nn.Module, tokenizer: Any, out_dir: Path, merge_lora: bool = False) -> Path:
    """Write a Hugging Face folder: the full model, or the LoRA adapter only (``merge_lora`` folds it in first)."""
    from peft import PeftModel

    out_dir.mkdir(parents=True, exist_ok=True)
    if merge_lora and isinstance(model, PeftModel):
        model = model.merge_and_unload()
    with quiet_transformers_progress():
        model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    return out_dir
