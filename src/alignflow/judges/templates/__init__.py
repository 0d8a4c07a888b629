"""Judge prompt templates: plain-text files users can copy and edit.

Shipped: ``pairwise.txt`` (placeholders ``{prompt}``, ``{a}``, ``{b}``; asks for "A", "B" or "tie", in the
MT-Bench layout of Zheng et al. 2023) and ``rubric.txt`` (``{prompt}``, ``{response}``; asks for a 1–10
rating). Only those four placeholders are substituted, in one pass, so braces elsewhere in a template (a JSON
example) and placeholders inside a candidate's text are left as they are.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

from alignflow.judges.base import JudgeError

_DIR = Path(__file__).parent
_PLACEHOLDER = re.compile(r"\{(prompt|a|b|response)\}")
REQUIRED = {"pairwise": ("prompt", "a", "b"), "rubric": ("prompt", "response")}


@dataclass(frozen=True)
class Template:
    """A template's text, where it came from (for errors) and the SHA-256 of its text (for cache keys)."""

    text: str
    source: str
    sha256: str

    @property
    def tail(self) -> str:
        """The constant text after the last placeholder, trailing whitespace removed."""
        return _PLACEHOLDER.split(self.text.rstrip())[-1]

    def render(self, **values: str) -> str:
        return _PLACEHOLDER.sub(
            lambda m: values[m.group(1)] if m.group(1) in values else m.group(0), self.text
        )


def load_template(path: str | Path | None, mode: str, spec: str) -> Template:
    """The template at ``path`` (a user's file), or the shipped one for ``mode`` (``pairwise`` / ``rubric``),
    checked to contain that mode's placeholders."""
    if mode not in REQUIRED:
        raise JudgeError(f"judge {spec!r}: mode must be one of {sorted(REQUIRED)}, got {mode!r}")
    file = Path(path).expanduser() if path else _DIR / f"{mode}.txt"
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise JudgeError(f"judge {spec!r}: template {str(file)!r}: cannot be read ({exc.strerror})") from None
    found = set(_PLACEHOLDER.findall(text))
    missing = [f"{{{p}}}" for p in REQUIRED[mode] if p not in found]
    if missing:
        raise JudgeError(
            f"judge {spec!r}: template {str(file)!r}: a {mode} template needs the placeholder(s) "
            f"{', '.join(missing)}"
        )
    return Template(text, str(file), hashlib.sha256(text.encode("utf-8")).hexdigest())
