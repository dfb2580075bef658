"""Validation: synthesize inputs from a graph's signature, prove parity against the original model."""
from __future__ import annotations

from mlstep.validate.inputs import Case, synthesize_inputs
from mlstep.validate.parity import ParityResult, check_parity, providers, run_reference

__all__ = ["Case", "ParityResult", "check_parity", "providers", "run_reference", "synthesize_inputs"]
