"""Parity: the candidate against the ORIGINAL model run with every ONNX Runtime optimization off.

Tolerances (per output, per case; outputs matched by name):
- fp32: every element satisfies ``|a - b| <= 1e-4 + 1e-3 * |ref|``;
- fp16: ``max|a - b| <= 2e-2 * max|ref|``.
NaN anywhere (reference or candidate), a missing output or a shape mismatch fails; their difference is
reported as ``inf`` so that reports stay valid JSON. Integer and bool outputs must match exactly.
Feeds are adapted to each session's signature (dtype cast, inputs the model no longer has dropped), so a
candidate with int32 ids or float16 inputs is fed the same values as the reference.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Sequence

import numpy as np
import onnxruntime as ort

from mlstep.validate.inputs import Case

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
FP32_ATOL, FP32_RTOL = 1e-4, 1e-3
FP16_REL = 2e-2
_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(bool)": np.bool_,
              "tensor(int8)": np.int8, "tensor(uint8)": np.uint8}


@dataclass
class ParityResult:
    max_abs_diff: float
    passed: bool
    worst_output: str
    worst_case: str
    provider: str
    per_output: dict[str, float] = field(default_factory=dict)


def providers(use_gpu: bool) -> list[str]:
    """[CUDA, CPU] when asked for and CUDA really loads in a session (checked once), else [CPU]."""
    return [CUDA, CPU] if use_gpu and _cuda_loads() else [CPU]


@lru_cache(maxsize=1)
def _cuda_loads() -> bool:
    if CUDA not in ort.get_available_providers():
        return False
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception:  # a broken CUDA install raises instead of falling back
        return False
    return CUDA in session.get_providers()


def _session(path: str | os.PathLike, providers_: Sequence[str] | None,
             level: ort.GraphOptimizationLevel) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.graph_optimization_level = level
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=list(providers_ or [CPU]))


def _run(session: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    adapted = {}
    for arg in session.get_inputs():
        if arg.name in feeds:
            dtype = _ORT_TYPES.get(arg.type)
            value = feeds[arg.name]
            adapted[arg.name] = value.astype(dtype) if dtype is not None and value.dtype != dtype else value
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, adapted)))


def run_reference(model_path: str | os.PathLike, cases: Sequence[Case],
                  providers: Sequence[str] | None = None) -> list[dict[str, np.ndarray]]:
    """Outputs of the original model for each case, with graph optimizations disabled."""
    session = _session(model_path, providers, ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    return [_run(session, case.feeds) for case in cases]


def check_parity(reference_path: str | os.PathLike, candidate_path: str | os.PathLike, precision: str,
                 cases: Sequence[Case], providers: Sequence[str] | None = None,
                 reference_outputs: Sequence[dict[str, np.ndarray]] | None = None) -> ParityResult:
    """Run the candidate (default optimization level) and compare it with the reference, case by case."""
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"precision must be 'fp32' or 'fp16', not {precision!r}")
    if reference_outputs is None:
        reference_outputs = run_reference(reference_path, cases, providers)
    session = _session(candidate_path, providers, ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    per_output: dict[str, float] = {}
    worst = (False, -1.0, "", "")  # (failed, diff, output, case): the largest wins
    for case, expected in zip(cases, reference_outputs):
        got = _run(session, case.feeds)
        for name, ref in expected.items():
            diff, ok = _compare(ref, got.get(name), precision)
            per_output[name] = max(per_output.get(name, 0.0), diff)
            worst = max(worst, (not ok, diff, name, case.name))
    failed, diff, name, case_name = worst
    return ParityResult(max_abs_diff=max(per_output.values(), default=0.0), passed=not failed,
                        worst_output=name, worst_case=case_name, provider=session.get_providers()[0],
                        per_output=per_output)


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
