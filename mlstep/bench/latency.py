"""Latency of one model on fixed feeds, with an ONNX Runtime session.

Every model of one run (the unoptimized baseline and each variant) is measured in the same process, with
the same feeds, the same providers and ONNX Runtime's default session settings (graph optimization
ORT_ENABLE_ALL, intra-op threads = ORT's default), so that the speedup is what a user serving the model
would see from replacing the original file with the variant.

Feeds are adapted to each session's declared input types (int64 ids given to an ``input_int32`` variant
become int32; float32 given to a float16 input become float16), so one set of feeds serves them all.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlstep.errors import BadInputError

# ONNX Runtime's input type strings -> numpy dtypes (the ones a transformer signature uses).
_ORT_DTYPES = {
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
    "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
}


@dataclass(frozen=True)
class LatencyStats:
    median_ms: float
    p90_ms: float
    p95_ms: float
    mean_ms: float
    provider: str        # the provider the session actually put first (CUDA may fall back to CPU)

    def as_dict(self) -> dict:
        return asdict(self)


def measure(model_path: str | Path, feeds: Mapping[str, np.ndarray], providers: Sequence[str] | None = None,
            warmup: int = 5, repeat: int = 30) -> LatencyStats:
    """Time ``repeat`` runs of ``model_path`` on ``feeds`` after ``warmup`` untimed runs."""
    if warmup < 0 or repeat < 1:
        raise BadInputError(f"latency: warmup must be >= 0 and repeat >= 1 (got {warmup}, {repeat})")
    session = _session(Path(model_path), providers)
    run = _make_runner(session, adapt_feeds(session, feeds))
    for _ in range(warmup):
        run()
    times = np.empty(repeat, dtype=np.float64)
    for i in range(repeat):
        start = time.perf_counter()
        run()
        times[i] = (time.perf_counter() - start) * 1e3
    p50, p90, p95 = np.percentile(times, [50, 90, 95])
    return LatencyStats(float(p50), float(p90), float(p95), float(times.mean()), session.get_providers()[0])


def adapt_feeds(session, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Keep the feeds the session declares, each cast to the declared element type."""
    adapted = {}
    for arg in session.get_inputs():
        if arg.name not in feeds:
            raise BadInputError(f"latency: no feed for model input {arg.name!r}")
        value = np.asarray(feeds[arg.name])
        dtype = _ORT_DTYPES.get(arg.type)
        adapted[arg.name] = value.astype(dtype) if dtype is not None and value.dtype != dtype else value
    return adapted


def _session(path: Path, providers: Sequence[str] | None):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3          # ORT's warnings (e.g. unused initializers) are not ours to print
    return ort.InferenceSession(str(path), options, providers=list(providers or ["CPUExecutionProvider"]))


def _make_runner(session, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One timed call.

    Hook for a later issue: on CUDAExecutionProvider, bind the inputs once on the device and the outputs to
    device buffers with ``session.io_binding()`` and return ``lambda: session.run_with_iobinding(binding)``, so
    that host<->device copies are not part of the figure. Today every provider runs with host arrays.
    """
    return lambda: session.run(None, feeds)
