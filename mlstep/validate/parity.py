"""Parity: the candidate against the ORIGINAL model run with every ONNX Runtime optimization off.

Tolerances (per output, per case; outputs matched by name):
- fp32: every element satisfies ``|a - b| <= 1e-4 + 1e-3 * |ref|``;
- fp16: ``max|a - b| <= 2e-2 * max|ref|``.
NaN anywhere (reference or candidate), a missing output or a shape mismatch fails; their difference is
reported as ``inf`` so that reports stay valid JSON. Integer and bool outputs must match exactly.
Feeds are adapted to each session's signature (dtype cast, inputs the model no longer has dropped), so a
candidate with int32 ids or float16 inputs is fed the same values as the reference. Sessions come from
:mod:`mlstep.runtime`.

Unspecified padding: a candidate whose metadata names a mask input (``mlstep.unspecified_padding``, written by
an attention fusion whose fused op defines rows that see no key differently from the export, see
``probe.causal_masking``) is compared everywhere except at the positions that input marks as padding (0), in
each output with a batch axis and a position axis: hidden states and logits ``[B, S, ...]`` (the last S entries
of the mask), presents ``[.., B, .., T, ..]`` (T = past + S: the whole mask). Those axes are facts, not
spellings: the source's value analysis (dims equal to the mask's batch dim, to its total length, or to the
new tokens' length), or, where it has no dims, the run-time shapes (equal to B, to T or to S in every case, and
varying with the length). An output whose axes are not identified exactly once is compared whole. The values
left out are counted and their largest difference reported (``ParityResult.excluded``).

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
    unspecified_padding: str = ""        # the mask input whose padded positions are not compared ("" = none)
    excluded: dict[str, tuple[int, float]] = field(default_factory=dict)   # output -> (values left out, max diff)


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
    mask_name = unspecified_padding(session)
    axes = padded_axes(reference_path, mask_name, cases, reference_outputs) if mask_name else {}
    per_output: dict[str, float] = {}
    excluded: dict[str, tuple[int, float]] = {}
    worst = (False, -1.0, "", "")  # (failed, diff, output, case): the largest wins
    for case, expected in zip(cases, reference_outputs):
        got = runtime.run(session, case.feeds)
        for name, ref in expected.items():
            skip = _padded_positions(case.feeds.get(mask_name), axes.get(name), np.shape(ref))
            diff, ok = _compare(ref, got.get(name), precision, skip)
            if skip is not None and got.get(name) is not None and np.shape(got[name]) == np.shape(ref):
                count, most = excluded.get(name, (0, 0.0))
                excluded[name] = (count + int(skip.sum()), max(most, _max_diff(ref, got[name], skip)))
            per_output[name] = max(per_output.get(name, 0.0), diff)
            worst = max(worst, (not ok, diff, name, case.name))
    failed, diff, name, case_name = worst
    return ParityResult(max_abs_diff=max(per_output.values(), default=0.0), passed=not failed,
                        worst_output=name, worst_case=case_name, provider=session.get_providers()[0],
                        per_output=per_output, cases=tuple(c.name for c in cases),
                        unspecified_padding=mask_name if excluded else "", excluded=excluded)


# ------------------------------------------------------------------------------- unspecified padding

def unspecified_padding(session) -> str:
    """The mask input the candidate's metadata names as unspecified padding ("" when none), read from its ONNX
    Runtime session (``metadata_props`` are its custom metadata: the file is not parsed again)."""
    from mlstep.optimizer.fusions._base import UNSPECIFIED_PADDING

    names = session.get_modelmeta().custom_metadata_map.get(UNSPECIFIED_PADDING, "")
    return names.split(",")[0]


def padded_axes(reference_path: str | os.PathLike, mask_name: str, cases: Sequence[Case],
                outputs: Sequence[dict[str, np.ndarray]]) -> dict[str, tuple[int, int]]:
    """Output name -> (batch axis, position axis), for the outputs where each is identified exactly once (see the
    module docstring); the others are absent (compared whole)."""
    from mlstep.optimizer import io
    from mlstep.optimizer.values import facts

    model = io.load(reference_path)
    known = facts(model.graph)
    mask = next((v for v in model.graph.inputs if v.name == mask_name), None)
    mask_dims = known.dims(mask)
    if mask is None or mask_dims is None or len(mask_dims) != 2:
        return {}
    # the new tokens' length: dim 1 of the other inputs that start with the mask's batch dim (ids, hidden states)
    tokens = [v for v in model.graph.inputs if v is not mask and (known.dims(v) or [None])[0] is not None
              and len(known.dims(v)) >= 2 and known.same_dim(known.dims(v)[0], mask_dims[0])]
    seq_dims = {known.dims(v)[1] for v in tokens}
    seq = seq_dims.pop() if len(seq_dims) == 1 else None
    seq_input = next((v.name for v in tokens), None) if seq is not None else None
    runs = [(case.feeds[mask_name].shape, case.feeds[seq_input].shape[1] if seq_input in case.feeds else None, out)
            for case, out in zip(cases, outputs) if mask_name in case.feeds]
    if len(runs) < 2:
        return {}
    found = {}
    for value in model.graph.outputs:
        dims = known.dims(value)
        shapes = [np.shape(out.get(value.name)) for _, _, out in runs]
        if any(len(shape) != len(shapes[0]) for shape in shapes) or not shapes[0]:
            continue
        rank = len(shapes[0])
        dims = dims if dims is not None and len(dims) == rank else [None] * rank

        def runtime(axis, size_of):    # equal to a size in every case, and varying when the size does
            sizes = [shape[axis] for shape in shapes]
            wanted = [size_of(m, s) for m, s, _ in runs]
            return None not in wanted and sizes == wanted and (len(set(wanted)) > 1 or size_of is _batch)

        batch = [k for k in range(rank) if (known.same_dim(dims[k], mask_dims[0]) if dims[k] is not None
                                            else runtime(k, _batch))]
        position = [k for k in range(rank) if k not in batch and (
            (known.same_dim(dims[k], mask_dims[1]) or (seq is not None and known.same_dim(dims[k], seq)))
            if dims[k] is not None else (runtime(k, _total) or runtime(k, _new)))]
        fits = all(shape[position[0]] <= m[1] and shape[batch[0]] == m[0]
                   for shape, (m, _, _) in zip(shapes, runs)) if len(batch) == 1 and len(position) == 1 else False
        if fits:
            found[value.name] = (batch[0], position[0])
    return found


def _batch(mask_shape, _new):
    return mask_shape[0]


def _total(mask_shape, _new):
    return mask_shape[1]


def _new(_mask_shape, new):
    return new


def _padded_positions(mask: np.ndarray | None, axes: tuple[int, int] | None, shape) -> np.ndarray | None:
    """Boolean, the output's shape: True where the output belongs to a position the mask marks as padding (the
    last n mask entries for a position axis of size n); None when nothing is left out."""
    if mask is None or axes is None or not len(shape) or np.asarray(mask).ndim != 2:
        return None
    batch, position = axes
    n = shape[position]
    if shape[batch] != mask.shape[0] or n > mask.shape[1]:
        return None
    padded = np.asarray(mask)[:, mask.shape[1] - n:] == 0
    if not padded.any():
        return None
    padded = padded if batch < position else padded.T
    view = [1] * len(shape)
    view[batch], view[position] = shape[batch], n
    return np.broadcast_to(padded.reshape(view), shape)


def _max_diff(ref: np.ndarray, got: np.ndarray, where: np.ndarray) -> float:
    if not np.issubdtype(np.asarray(ref).dtype, np.floating):
        return float(np.abs(ref.astype(np.float64) - got.astype(np.float64))[where].max())
    with np.errstate(invalid="ignore"):
        diff = np.abs(np.asarray(ref, np.float64) - np.asarray(got, np.float64))[where]
    return float(np.nan_to_num(diff, nan=math.inf).max()) if diff.size else 0.0


def _compare(ref: np.ndarray, got: np.ndarray | None, precision: str,
             skip: np.ndarray | None = None) -> tuple[float, bool]:
    """(max |ref - got|, within tolerance), over the elements ``skip`` does not mark."""
    if got is None or np.shape(ref) != np.shape(got):
        return math.inf, False
    ref = np.asarray(ref)
    got = np.asarray(got)
    if skip is not None:
        ref, got = ref[~skip], got[~skip]
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
