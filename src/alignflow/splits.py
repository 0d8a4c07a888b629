"""The one prompt hash bucket behind every train/eval split (recipes, curation, annotation efficiency).

Kept at the bottom layer so that any package can split by prompt the same way without importing the data layer.
"""

from __future__ import annotations

import hashlib


def prompt_bucket(prompt: str) -> float:
    """A deterministic number in [0, 1) from the prompt text (sha256), used to split train/eval BY PROMPT."""
    digest = hashlib.sha256(prompt.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64
