"""Parity: the candidate against the ORIGINAL model run with every ONNX Runtime optimization off.

Tolerances (per output, per case; outputs matched by name):
- fp32: every element satisfies ``|a - b| <= 1e-4 + 1e-3 * |ref|``;
- fp16: ``max|a - b| <= 2e-2 * max|ref|``.
NaN anywhere (reference or candidate), a missing output or a shape mismatch fails; their difference is
reported as ``inf`` so that reports stay valid JSON. Integer and bool outputs must match exactly.
Feeds are adapted to each session's signature (dtype cast, inputs the model no longer has dropped), so a
candidate with int32 ids or float16 inputs is fed the same values as the reference. Sessions come from
:mod:`mlstep.runtime`.

Cases (:func:`parity_cases`): a fusion accepted on short probes can be wrong at other lengths (a sliding-
window mask fused as plain causal attention is exact up to its window), so parity runs at the user's
shape, at a long sequence (``LONG_SEQUENCE`` = 64) and, for a model with past inputs, at past {1, 17} x
new tokens {1, 8} with left padding; each with masks padded right and left (batch >= 2).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from mlstep import runtime
from mlstep.runtime import CPU, CUDA, providers  # noqa: F401 (re-exported: callers import them from here)
from mlstep.validate.inputs import Case, synthesize_inputs

FP32_ATOL, FP32_RTOL = 1e-4, 1e-3
FP16_REL = 2e-2
LONG_SEQUENCE = 64                       # parity also runs at this length (short probes fool fusions)
PAST_LENGTHS = (1, 17)                   # models with past: past lengths x new tokens, left-padded
NEW_TOKENS = (1, 8)


@dataclass
class ParityResult:
    max_abs_diff: float
    passed: bool
    worst_output: str
    worst_case: str
    provider: str
    per_output: dict[str, float] = field(default_factory=dict)
    cases: tuple[str, ...] = ()          # the case names compared (shapes and padding)


def parity_cases(model, batch: int = 2, sequence: int = 8, seed: int = 0) -> list[Case]:
    """The cases parity runs: the user's shapes, a long sequence, and for models with past inputs past
    {1, 17} x new tokens {1, 8} (no padding and left padding, as in generation).

    Case names carry the shape: ``s8/left-padded``, ``s64/right-padded``, ``past17+8/left-padded``.
    """
    cases = []
    lengths = [sequence] + ([LONG_SEQUENCE] if sequence < LONG_SEQUENCE else [])
    for length in lengths:
        cases += [Case(f"s{length}/{c.name}", c.feeds)
                  for c in synthesize_inputs(model, batch=batch, sequence=length, seed=seed)]
    if _has_past(model):
        for past in PAST_LENGTHS:
            for new in NEW_TOKENS:
                cases += [Case(f"past{past}+{new}/{c.name}", c.feeds)
                          for c in synthesize_inputs(model, batch=batch, sequence=new, seed=seed, past_sequence=past)
                          if c.name in ("no-padding", "left-padded")]
    return cases


def _has_past(model) -> bool:
    return any((v.name or "").lower().startswith("past") for v in model.graph.inputs if not v.is_initializer())


def run_reference(model_path: str | os.PathLike, cases: Sequence[Case],
                  providers: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs of the original model for each case, with graph optimizations disabled."""
    session = runtime.session(model_path, providers, runtime.DISABLE_ALL, exact=True)
    return [runtime.run(session, case.feeds) for case in cases]


def runnable_cases(model_path: str | os.PathLike, cases: Sequence[Case], providers: Sequence[str] | None = None,
                   ) -> tuple[list[Case], list[dict[str, np.ndarray]], list[str]]:
    """Run the source on every case and keep those it can run, with their outputs, plus a note per dropped case.

    A synthesized case can ask more of a graph than its signature says (a longer sequence than a table the
    synthesizer could not see, e.g. positions read from a mask): the source itself refuses it at run time. Such a
    case is dropped with a note naming ONNX Runtime's reason. The user's own shape (the first case's shape) must run:
    a source that cannot run its own declared shapes is bad input, not an internal error.
    """
    from mlstep.errors import BadInputError

    session = runtime.session(model_path, providers, runtime.DISABLE_ALL, exact=True)
    kept, outputs, notes = [], [], []
    user_shape = cases[0].name.split("/")[0] if cases else ""
    for case in cases:
        try:
            outputs.append(runtime.run(session, case.feeds))
        except Exception as err:   # onnxruntime raises its own exception classes from the C++ side
            reason = " ".join(str(err).split())[:300]
            if case.name.split("/")[0] == user_shape:
                raise BadInputError(f"the source fails in ONNX Runtime on inputs of its declared shapes "
                                    f"({case.name}): {reason}") from None
            notes.append(f"parity case {case.name} skipped: the source itself fails on it ({reason})")
            continue
        kept.append(case)
    return kept, outputs, notes


def check_parity(reference_path: str | os.PathLike, candidate_path: str | os.PathLike, precision: str,
                 cases: Sequence[Case], providers: Sequence[str] | None = None,
                 reference_outputs: Sequence[dict[str, np.ndarray]] | None = None) -> ParityResult:
    """Run the candidate (default optimization level) and compare it with the reference, case by case."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    if reference_outputs is None:
        reference_outputs = run_reference(reference_path, cases, providers)
    session = runtime.session(candidate_path, providers, runtime.ENABLE_ALL, exact=True)
    per_output: dict[str, float] = {}
    worst = (False, -1.0, "", "")  # (failed, diff, output, case): the largest wins
    for case, expected in zip(cases, reference_outputs):
        got = runtime.run(session, case.feeds)
        for name, ref in expected.items():
            diff, ok = _compare(ref, got.get(name), precision)
            per_output[name] = max(per_output.get(name, 0.0), diff)
            worst = max(worst, (not ok, diff, name, case.name))
    failed, diff, name, case_name = worst
    return ParityResult(max_abs_diff=max(per_output.values(), default=0.0), passed=not failed,
                        worst_output=name, worst_case=case_name, provider=session.get_providers()[0],
                        per_output=per_output, cases=tuple(c.name for c in cases))


def _compare(ref: np.ndarray, got: np.ndarray | None, precision: str) -> tuple[float, bool]:
    """(max |ref - got|, within tolerance)."""
    if got is None or np.shape(ref) != np.shape(got):
        return math.inf, False
    ref = np.asarray(ref)
    got = np.asarray(got)
    if not np.issubdtype(ref.dtype, np.floating):
        diff = np.abs(ref.astype(np.float64) - got.astype(np.float64))
        biggest = float(diff.max()) if diff.size else 0.0
        return biggest, biggest == 0.0
    r = ref.astype(np.float64)
    g = got.astype(np.float64)
    if np.isnan(r).any() or np.isnan(g).any():
        return math.inf, False
    diff = np.abs(r - g)
    if not diff.size:
        return 0.0, True
    with np.errstate(invalid="ignore"):
        biggest = float(np.nan_to_num(diff, nan=math.inf).max())
    if precision == "fp32":
        return biggest, bool(np.all(diff <= FP32_ATOL + FP32_RTOL * np.abs(r)))
    return biggest, bool(biggest <= FP16_REL * float(np.abs(r).max()))
