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

import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from mlstep.errors import BadInputError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

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


def open_session(path: str | Path, providers: Sequence[str] | None = None, threads: int = 0):
    """A session with ORT's default optimization level; ``threads`` > 0 sets intra-op threads (0: ORT's
    default, one per physical core)."""
    import onnxruntime as ort

    if threads < 0:
        raise BadInputError(f"latency: threads must be >= 0 (got {threads})")
    options = ort.SessionOptions()
    options.log_severity_level = 3          # ORT's warnings (e.g. unused initializers) are not ours to print
    options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or [CPU]))
    except Exception as err:                # ORT raises its own types; one line is what the user needs
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise BadInputError(f"{path}: ONNX Runtime cannot load it ({first})") from err


def intra_op_threads(threads: int = 0) -> int:
    """The intra-op thread count a session made with ``threads`` uses (ORT's default: physical cores)."""
    if threads > 0:
        return threads
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return int(os.cpu_count() or 1)


def uses_io_binding(session) -> bool:
    """True when :func:`make_runner` times this session with IO binding (its first provider is CUDA)."""
    return session.get_providers()[0] == CUDA


def make_runner(session, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One timed call.

    On CUDAExecutionProvider the inputs are copied to the device once and bound (``OrtValue`` on
    ``cuda:0``), the outputs are bound to device memory that ORT allocates, and the call is
    ``session.run_with_iobinding(binding)``: host<->device copies are not part of the figure (ORT
    synchronizes the device at the end of a run, so the wall time covers the kernels). Every other provider
    runs with host arrays (``session.run``).
    """
    if not uses_io_binding(session):
        return lambda: session.run(None, feeds)
    import onnxruntime as ort

    binding = session.io_binding()
    # Keep the device copies alive as long as the runner: the binding holds raw pointers to them.
    device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
                     for name, value in feeds.items()}
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for output in session.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def run():
        session.run_with_iobinding(binding)
        return device_inputs

    return run
