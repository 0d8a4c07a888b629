"""Synthetic feedback data: constitutional critique-and-revise (:mod:`alignflow.synth.constitution`) and
instruction synthesis by self-instruct or Evol-Instruct (:mod:`alignflow.synth.instructions`)."""

from alignflow.synth.constitution import (
    Constitution,
    ConstitutionError,
    ConstitutionResult,
    Principle,
    load_constitution,
    run_constitution,
)
from alignflow.synth.instructions import METHODS, SynthesisResult, synthesize

__all__ = [
    "METHODS",
    "Constitution",
    "ConstitutionError",
    "ConstitutionResult",
    "Principle",
    "SynthesisResult",
    "load_constitution",
    "run_constitution",
    "synthesize",
]
