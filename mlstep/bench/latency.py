"""Latency of one model on fixed feeds, with an ONNX Runtime session.

Every model of one run (the unoptimized baseline and each variant) is measured in the same process, with
the same feeds, the same providers and ONNX Runtime's default session settings (graph optimization
ORT_ENABLE_ALL, intra-op threads = ORT's default), so that the speedup is what a user serving the model
would see from replacing the original file with the variant.

On CUDA the inputs are bound on the device once and the outputs bound to device memory (IO binding,
:func:`make_runner`), so the figure is the model, not host<->device copies. The pytest-benchmark gates
(:mod:`mlstep.bench.gates`) and the ``mlstep benchmark`` grid (:mod:`mlstep.bench.grid`) build on the pieces
here: :func:`open_session`, :func:`adapt_feeds`, :func:`make_runner`, :func:`time_calls`, :func:`summarize`.

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
from mlstep.runtime import CPU, CUDA, adapt_feeds, intra_op_threads, make_runner, uses_io_binding
from mlstep.runtime import session as _session


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
            warmup: int = 5, repeat: int = 30, threads: int = 0) -> LatencyStats:
    """Time ``repeat`` runs of ``model_path`` on ``feeds`` after ``warmup`` untimed runs."""
    if warmup < 0 or repeat < 1:
        raise BadInputError(f"latency: warmup must be >= 0 and repeat >= 1 (got {warmup}, {repeat})")
    session = open_session(Path(model_path), providers, threads)
    run = make_runner(session, adapt_feeds(session, feeds))
    return summarize(time_calls(run, warmup, repeat), session.get_providers()[0])


def time_calls(run: Callable[[], object], warmup: int, repeat: int) -> np.ndarray:
    """Milliseconds of each of ``repeat`` calls of ``run`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    times = np.empty(repeat, dtype=np.float64)
    for i in range(repeat):
        start = time.perf_counter()
        run()
        times[i] = (time.perf_counter() - start) * 1e3
    return times


def summarize(times_ms, provider: str) -> LatencyStats:
    """Median / p90 / p95 / mean of per-call milliseconds."""
    times_ms = np.asarray(times_ms, dtype=np.float64)
    p50, p90, p95 = np.percentile(times_ms, [50, 90, 95])
    return LatencyStats(float(p50), float(p90), float(p95), float(times_ms.mean()), provider)


def open_session(path: str | Path, providers: Sequence[str] | None = None, threads: int = 0):
    """A session with ORT's default optimization level; ``threads`` > 0 sets intra-op threads (0: ORT's
    default, one per physical core). (``mlstep.runtime.session``.)"""
    return _session(path, providers, threads=threads)


__all__ = ["CPU", "CUDA", "LatencyStats", "adapt_feeds", "intra_op_threads", "make_runner", "measure",
           "open_session", "summarize", "time_calls", "uses_io_binding"]
