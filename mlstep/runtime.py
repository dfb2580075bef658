"""ONNX Runtime, defined once: providers, sessions, feeds adapted to a session, IO binding.

Every part of mlstep that runs a model (parity, the latency gates, the benchmark grid, the load check of
each written variant) goes through here, so "which providers", "which optimization level" and "how is a
load failure reported" have one answer:

- :func:`providers` -- ``[CUDA, CPU]`` when asked for and CUDA really loads in a session (probed once),
  else ``[CPU]``; :func:`require_cuda` raises ``BadInputError`` (exit 2) when CUDA does not load, and
  :func:`gpu_fallback` states a ``--use-gpu`` that ran on the CPU; both give the dynamic loader's own
  reason in one line (a missing ``libcudnn``/``libcublas``), not ONNX Runtime's multi-line log.
- :func:`session` -- an ``InferenceSession`` at a given optimization level and thread count; a model that
  ONNX Runtime refuses is one ``BadInputError`` line with ORT's own first line as the reason.
- :func:`adapt_feeds` -- the feeds a session declares, each cast to its declared element type (int64 ids
  for an ``input_int32`` variant become int32, float32 for a float16 input become float16).
- :func:`make_runner` -- one call of the model; on CUDA with IO binding (inputs bound on the device once,
  outputs in device memory), so a timing is the model and not host<->device copies.
- :func:`load_check` -- a variant that was written must load in ONNX Runtime; if not, that is mlstep's bug
  (``VariantLoadError``, exit 3) and the model is kept aside for the bug report.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from mlstep.errors import BadInputError, VariantLoadError

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"

# ONNX Runtime's input type strings -> numpy dtypes (the ones a transformer signature uses).
ORT_DTYPES = {
    "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(float)": np.float32,
    "tensor(float16)": np.float16, "tensor(double)": np.float64, "tensor(bool)": np.bool_,
    "tensor(int8)": np.int8, "tensor(uint8)": np.uint8,
}
# Optimization levels by name (strings keep onnxruntime out of import time).
DISABLE_ALL, ENABLE_ALL = "disable_all", "enable_all"


def providers(use_gpu: bool) -> list[str]:
    """[CUDA, CPU] when asked for and CUDA really loads in a session (checked once), else [CPU]."""
    return [CUDA, CPU] if use_gpu and cuda_loads() else [CPU]


def cuda_loads() -> bool:
    return cuda_status()[0]


def cuda_unavailable_reason() -> str | None:
    """Why CUDAExecutionProvider does not load here, in one line (the loader's own words); None when it loads."""
    return cuda_status()[1]


def gpu_fallback(use_gpu: bool) -> str | None:
    """One line when ``--use-gpu`` was asked for and the step runs on the CPU instead; else None."""
    reason = cuda_unavailable_reason() if use_gpu else None
    return f"--use-gpu: ran on the CPU because {CUDA} did not load ({reason})" if reason else None


@lru_cache(maxsize=1)
def cuda_status() -> tuple[bool, str | None]:
    """(loads, why not): a session on [CUDA, CPU] must really get CUDA; the reason is the dynamic loader's
    message for the provider library (e.g. ``libcudnn.so.9: cannot open shared object file``), not ONNX
    Runtime's multi-line log."""
    import onnxruntime as ort

    version = ort.__version__
    if CUDA not in ort.get_available_providers():
        return False, (f"onnxruntime {version} is a build without CUDA; install onnxruntime-gpu")
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "probe", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    # A CUDA that fails to load is logged by ORT's default logger (several lines on stderr); the caller says
    # it in one line. ORT has no getter: restore its default level (warning) afterwards.
    ort.set_default_logger_severity(4)
    try:
        probe = ort.InferenceSession(model.SerializeToString(), options, providers=[CUDA, CPU])
    except Exception as err:  # a broken CUDA install raises instead of falling back
        return False, _loader_error() or first_line(err)
    finally:
        ort.set_default_logger_severity(2)
    if CUDA in probe.get_providers():
        return True, None
    return False, _loader_error() or (f"its libraries load but no session got it: no usable GPU or driver "
                                      f"(onnxruntime-gpu {version})")


def _loader_error() -> str | None:
    """The dynamic loader's error for ORT's CUDA provider library (a missing CUDA/cuDNN library), or None."""
    import ctypes

    import onnxruntime as ort

    capi = Path(ort.__file__).parent / "capi"
    found = sorted(capi.glob("libonnxruntime_providers_cuda.*")) + sorted(capi.glob("onnxruntime_providers_cuda.dll"))
    if not found:
        return None
    try:
        shared = next(iter(sorted(capi.glob("libonnxruntime_providers_shared.*"))), None)
        if shared is not None:
            ctypes.CDLL(str(shared), mode=getattr(ctypes, "RTLD_GLOBAL", 0))
        ctypes.CDLL(str(found[0]))
    except OSError as err:
        return f"{' '.join(str(err).split()).replace(f'{capi}/', '')}; onnxruntime-gpu {ort.__version__}"
    return None


def require_cuda() -> None:
    """Raise ``BadInputError`` (exit 2) unless CUDAExecutionProvider loads in a session here."""
    reason = cuda_unavailable_reason()
    if reason:
        raise BadInputError(f"--require-gpu: {CUDA} did not load ({reason}); refusing to measure on the CPU")


def session(path: str | os.PathLike, providers_: Sequence[str] | None = None, level: str = ENABLE_ALL,
            threads: int = 0, exact: bool = False):
    """An ``InferenceSession`` of ``path``; ORT's refusal becomes one ``BadInputError`` line.

    ``exact``: float32 MatMuls in float32 on CUDA (``use_tf32=0``). ONNX Runtime's CUDA provider computes them
    in TF32 by default on Ampere and later, which moves a bert-base output by ~5e-3 between two equivalent
    graphs (measured on an H200): parity sessions ask for exact arithmetic so that they check the graph, not
    the GPU's reduced-precision mode. Latency is measured with the provider's defaults.
    """
    import onnxruntime as ort

    if threads < 0:
        raise BadInputError(f"threads must be >= 0 (got {threads})")
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_DISABLE_ALL if level == DISABLE_ALL
                                        else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
    options.log_severity_level = 3          # ORT's warnings (e.g. unused initializers) are not ours to print
    options.intra_op_num_threads = threads
    try:
        chosen = [(name, {"use_tf32": "0"}) if exact and name == CUDA else name for name in providers_ or [CPU]]
        return ort.InferenceSession(str(path), options, providers=chosen)
    except Exception as err:                # ORT raises its own types; one line is what the user needs
        raise BadInputError(f"{Path(path).name}: ONNX Runtime cannot load it ({first_line(err)})") from err


def adapt_feeds(session_, feeds: Mapping[str, np.ndarray], strict: bool = True) -> dict[str, np.ndarray]:
    """The feeds ``session_`` declares, each cast to the declared element type.

    ``strict``: a declared input without a feed is an error; otherwise it is left out (ORT then says so).
    """
    adapted = {}
    for arg in session_.get_inputs():
        if arg.name not in feeds:
            if strict:
                raise BadInputError(f"no feed for model input {arg.name!r}")
            continue
        value = np.asarray(feeds[arg.name])
        dtype = ORT_DTYPES.get(arg.type)
        adapted[arg.name] = value.astype(dtype) if dtype is not None and value.dtype != dtype else value
    return adapted


def run(session_, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """All outputs by name, on feeds adapted to the session (missing feeds left to ORT to report)."""
    names = [o.name for o in session_.get_outputs()]
    return dict(zip(names, session_.run(names, adapt_feeds(session_, feeds, strict=False))))


def intra_op_threads(threads: int = 0) -> int:
    """The intra-op thread count a session made with ``threads`` uses (ORT's default: physical cores)."""
    if threads > 0:
        return threads
    try:
        import psutil

        return int(psutil.cpu_count(logical=False) or os.cpu_count() or 1)
    except ImportError:  # pragma: no cover - psutil is a dependency
        return int(os.cpu_count() or 1)


def uses_io_binding(session_) -> bool:
    """True when :func:`make_runner` times this session with IO binding (its first provider is CUDA)."""
    return session_.get_providers()[0] == CUDA


def make_runner(session_, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """One call of the model: ``session.run`` with host arrays, or on CUDA ``run_with_iobinding`` with the
    inputs copied to the device once and the outputs bound to device memory (ORT synchronizes the device at
    the end of a run, so the wall time covers the kernels)."""
    if not uses_io_binding(session_):
        return lambda: session_.run(None, feeds)
    import onnxruntime as ort

    binding = session_.io_binding()
    # Keep the device copies alive as long as the runner: the binding holds raw pointers to them.
    device_inputs = {name: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), "cuda", 0)
                     for name, value in feeds.items()}
    for name, value in device_inputs.items():
        binding.bind_ortvalue_input(name, value)
    for output in session_.get_outputs():
        binding.bind_output(output.name, "cuda", 0)

    def call():
        session_.run_with_iobinding(binding)
        return device_inputs

    return call


def load_check(path: str | os.PathLike, name: str, providers_: Sequence[str] | None = None) -> None:
    """A written variant must load in ONNX Runtime. If it does not, mlstep wrote a broken model: the variant's
    folder is copied aside (for the bug report) and ``VariantLoadError`` (exit 3) says where."""
    try:
        session(path, providers_, ENABLE_ALL)
    except BadInputError as err:
        kept = Path(tempfile.mkdtemp(prefix=f"mlstep-bug-{name}-"))
        shutil.copytree(Path(path).parent, kept / name, dirs_exist_ok=True)
        reason = str(err).split("(", 1)[-1].rstrip(")") if "(" in str(err) else str(err)
        raise VariantLoadError(f"the {name} variant mlstep wrote does not load in ONNX Runtime ({reason}); "
                               f"this is a bug in mlstep: please report it with the model kept at {kept / name}") \
            from err


def first_line(err: BaseException, limit: int = 300) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return lines[0][:limit] if lines else type(err).__name__
