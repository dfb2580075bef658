"""The local optimize step, as a list of stages.

    resolve source -> stage output folder -> optimize -> variants (fp32, fp16) -> inputs -> parity
    -> latency -> report -> move the output folder into place

Each stage takes the previous stage's value. Everything is written to a temporary folder beside the
output folder (same filesystem) and renamed into place at the end: on any error nothing is left behind
and an existing output folder is untouched; on success an existing output folder is replaced.

A failed gate is a result, not a crash: the outputs and the report (which says what failed) are moved
into place and ``StepResult.passed`` is False; ``StepResult.check()`` then raises ``GateFailedError``
(exit 1). The CLI prints its summary first, then calls ``check()``. Nothing that failed a gate is ever
registered (registration comes in a later issue and will read ``passed``).

Library use::

    from mlstep.optimizer import OptimizeOptions
    from mlstep.step import StepSettings, run
    result = run("model.onnx", "out", OptimizeOptions(num_heads=12), StepSettings(precisions=("fp32",)))
    result.report["variants"]["fp32"]["fusions"], result.passed
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlstep.errors import BadInputError, GateFailedError, OutputError, UsageError
from mlstep.optimizer.options import OptimizeOptions
from mlstep.report import VariantFacts, build_report, failed_gates, gates_passed, scrub, write_report

PRECISIONS = ("fp32", "fp16")
MODEL_FILE = "model.onnx"
LATENCY_DIR = "latency"        # the gates' benchmark.json, gates.json, latency.png
MLFLOW_SCHEMES = ("runs:/", "models:/")
STAGES = ("resolve", "optimize", "variants", "inputs", "parity", "latency", "report", "commit")


@dataclass(frozen=True)
class StepSettings:
    """What the step does around the optimizer (the optimizer's own options are ``OptimizeOptions``)."""

    precisions: tuple[str, ...] = PRECISIONS
    validate: bool = True                  # parity of every variant against the source (ORT_DISABLE_ALL)
    benchmark: bool = True                 # latency of every variant and of the source, same process
    batch_size: int = 2                    # synthesized inputs (parity and latency)
    sequence_length: int = 8
    warmup: int = 5
    repeat: int = 30
    max_slowdown: float = 0.05             # latency gate: variant median <= source median x (1 + max_slowdown)
    min_speedup: float | None = None       # latency gate (optional): source median / variant median >= this
    require_gpu: bool = False              # exit 2 unless CUDA loads: a GPU job never measures the CPU by accident

    def checked(self) -> "StepSettings":
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown:
            raise UsageError(f"unknown precision {unknown[0]!r} (choose from {', '.join(PRECISIONS)})")
        if not self.precisions:
            raise UsageError("no precision selected")
        if self.batch_size < 2 and self.validate:
            raise UsageError(f"batch size must be >= 2 for validation (padding on both sides), got {self.batch_size}")
        if self.batch_size < 1 or self.sequence_length < 1:
            raise UsageError("batch size and sequence length must be >= 1")
        # Keep the order of PRECISIONS and drop repeats: "--precision fp16 --precision fp32 --precision fp16".
        return dataclasses.replace(self, precisions=tuple(p for p in PRECISIONS if p in self.precisions))

    def as_dict(self) -> dict[str, Any]:
        return {"precision": list(self.precisions), "skip_validation": not self.validate,
                "skip_benchmark": not self.benchmark, "batch_size": self.batch_size,
                "sequence_length": self.sequence_length, "warmup": self.warmup, "repeat": self.repeat,
                "max_slowdown": self.max_slowdown, "min_speedup": self.min_speedup, "require_gpu": self.require_gpu}


class Listener(Protocol):
    """Progress events (the CLI draws them; the library default ignores them)."""

    def start(self, stage: str, detail: str = "") -> None: ...
    def done(self, stage: str, seconds: float, detail: str = "") -> None: ...


class _Quiet:
    def start(self, stage: str, detail: str = "") -> None:
        pass

    def done(self, stage: str, seconds: float, detail: str = "") -> None:
        pass


@dataclass
class StepResult:
    report: dict
    passed: bool
    output_dir: Path
    fusion_log: list = field(default_factory=list)     # optimizer FusionLog entries (what fused, what was refused)
    gates: Any = None        # mlstep.bench.gates.GateResults (files under output_dir/latency/) or None when skipped

    @property
    def no_fusions(self) -> bool:
        return not any(v["fusions"] for v in self.report["variants"].values())

    def check(self) -> "StepResult":
        """Raise ``GateFailedError`` (exit 1) when a gate failed."""
        if not self.passed:
            raise GateFailedError(f"gate failed: {'; '.join(failed_gates(self.report))} "
                                  f"(report: {self.output_dir / 'report.md'})")
        return self


def run(source: str | os.PathLike, output_dir: str | os.PathLike, options: OptimizeOptions = OptimizeOptions(),
        settings: StepSettings = StepSettings(), listener: Listener | None = None) -> StepResult:
    """Run the whole step; see the module docstring."""
    listener = listener or _Quiet()
    settings = settings.checked()
    # The CLI's --precision decides the fp16 variant; the option records it (and joins the options hash).
    options = dataclasses.replace(options, float16="fp16" in settings.precisions).validate()
    if settings.require_gpu:                      # fail before any work, not after optimizing on the CPU
        from mlstep.bench.gates import require_cuda
        require_cuda()

    with _stage(listener, "resolve", str(source)):
        model_path = resolve_source(source)
        if Path(output_dir).expanduser().resolve() in model_path.resolve().parents:
            raise UsageError(f"{model_path}: the source lies inside the output folder {output_dir}, "
                             "which this run replaces; choose another --output")
    with staged_output(output_dir) as tmp:
        with _stage(listener, "optimize", model_path.name) as note:
            optimized = _optimize(model_path, options)
            note(_fusion_text(optimized.fusions))
        with _stage(listener, "variants", ", ".join(settings.precisions)):
            paths, fusions = build_variants(optimized.model, settings.precisions, tmp)
        parity, latency, baseline, gates = {}, {}, None, None
        if settings.validate or settings.benchmark:
            with _stage(listener, "inputs", f"batch {settings.batch_size} x sequence {settings.sequence_length}"):
                cases = make_inputs(model_path, settings)
            providers = _providers(options.use_gpu or settings.require_gpu)
            if settings.validate:
                with _stage(listener, "parity") as note:
                    parity = validate(model_path, paths, cases, providers)
                    note(", ".join(f"{n} {'ok' if r.passed else 'FAILED'} ({r.max_abs_diff:.1e})"
                                   for n, r in parity.items()))
            if settings.benchmark:
                with _stage(listener, "latency") as note:
                    from mlstep.bench.gates import GateSettings, run_gates
                    gates = run_gates(model_path, paths, GateSettings.from_settings(
                        settings, use_gpu=options.use_gpu), output_dir=tmp / LATENCY_DIR)
                    baseline, latency = gates.baseline, {n: g.stats for n, g in gates.variants.items()}
                    note(", ".join(f"{n} {s.median_ms:.2f} ms" for n, s in latency.items())
                         + f" (source {baseline.median_ms:.2f} ms, {gates.provider})")
        with _stage(listener, "report"):
            facts = {name: VariantFacts(path=f"{name}/{MODEL_FILE}", fusions=fusions[name],
                                        parity=parity.get(name), latency=latency.get(name), baseline=baseline)
                     for name in settings.precisions}
            report = build_report(source=_source_text(source, model_path), model_type=optimized.detected.model_type,
                                  num_heads=optimized.detected.num_heads,
                                  hidden_size=optimized.detected.hidden_size,
                                  options=_options_dict(options, settings), variants=facts,
                                  optimizer_seconds=optimized.seconds)
            if gates is not None:
                from mlstep.bench.gates import apply_to_report
                apply_to_report(report, gates)   # gate.latency passed|failed, gate.passed
            write_report(report, tmp, fusion_log=optimized.log if options.verbose else None)
        listener.start("commit", str(output_dir))
        committing = time.perf_counter()
    listener.done("commit", time.perf_counter() - committing, str(output_dir))
    return StepResult(report, gates_passed(report), Path(output_dir), list(optimized.log),
                      gates.moved(tmp, output_dir) if gates is not None else None)


# ----------------------------------------------------------------------------------------------- stages

def resolve_source(source: str | os.PathLike) -> Path:
    """The local ``.onnx`` file to optimize.

    Accepts an ``.onnx`` file, an MLflow model directory (a folder with an ``MLmodel`` file whose onnx
    flavor names the model file, or holding exactly one ``.onnx``) or that ``MLmodel`` file itself.
    MLflow URIs (``runs:/``, ``models:/``) need the registry (a later issue) and are refused for now.
    """
    text = os.fspath(source)
    if text.startswith(MLFLOW_SCHEMES):
        raise BadInputError(f"{scrub(text)}: MLflow URIs need MLflow registry support, which is not available yet; "
                            "download the model and pass its directory or .onnx file")
    if "://" in text:
        raise BadInputError(f"{scrub(text)}: unsupported source (expected a .onnx file or an MLflow model directory)")
    path = Path(text).expanduser()
    if path.name == "MLmodel" and path.is_file():
        path = path.parent
    if path.is_dir():
        return _onnx_in_mlflow_dir(path)
    if not path.exists():
        raise BadInputError(f"{path}: no such file or directory")
    if not path.is_file():
        raise BadInputError(f"{path}: not a regular file")
    return path


def _onnx_in_mlflow_dir(path: Path) -> Path:
    mlmodel = path / "MLmodel"
    if not mlmodel.is_file():
        raise BadInputError(f"{path}: a directory without an MLmodel file (expected a .onnx file or an MLflow "
                            "model directory)")
    try:
        import yaml

        meta = yaml.safe_load(mlmodel.read_text(encoding="utf-8")) or {}
    except Exception as err:
        raise BadInputError(f"{mlmodel}: unreadable MLmodel file ({type(err).__name__})") from err
    flavor = (meta.get("flavors") or {}).get("onnx") if isinstance(meta, dict) else None
    if isinstance(flavor, dict) and isinstance(flavor.get("data"), str):
        candidate = (path / flavor["data"]).resolve()
        if path.resolve() not in candidate.parents:
            raise BadInputError(f"{mlmodel}: onnx flavor data {flavor['data']!r} escapes the model directory")
        if not candidate.is_file():
            raise BadInputError(f"{mlmodel}: onnx flavor names {flavor['data']!r}, which is missing")
        return candidate
    found = sorted(path.glob("*.onnx"))
    if len(found) != 1:
        what = "no .onnx file" if not found else f"{len(found)} .onnx files and no onnx flavor to choose"
        raise BadInputError(f"{path}: MLflow model directory with {what}")
    return found[0]


@contextlib.contextmanager
def staged_output(output_dir: str | os.PathLike) -> Iterator[Path]:
    """A temporary folder beside ``output_dir``, renamed to ``output_dir`` when the block succeeds.

    An existing ``output_dir`` is replaced only if it is empty or an earlier mlstep output (holds
    report.json): ``-o .`` or ``-o ~`` can never wipe a folder mlstep did not write. Parent folders that
    this call created are removed again on failure.
    """
    target = Path(output_dir).expanduser().absolute()
    if target.exists() or target.is_symlink():
        if not target.is_dir() or target.is_symlink():
            raise OutputError(f"{output_dir}: exists and is not a directory")
        if any(target.iterdir()) and not (target / "report.json").is_file():
            raise OutputError(f"{output_dir}: exists, is not empty and is not an mlstep output; "
                              "refusing to replace it")
    created = _make_parents(target.parent, output_dir)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.mlstep-", dir=target.parent))
        os.chmod(tmp, 0o777 & ~_umask())          # mkdtemp makes 0o700; the result is an ordinary folder
    except OSError as err:
        _remove_created(created)
        raise OutputError(f"{output_dir}: cannot write beside it ({err.strerror or err})") from err
    try:
        yield tmp
        _replace(tmp, target, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_created(created)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _make_parents(parent: Path, shown) -> list[Path]:
    missing = []
    probe = parent
    while not probe.exists() and not probe.is_symlink() and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{shown}: cannot create it: {probe} is not a directory")
    created = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except OSError as err:
            _remove_created(created)
            raise OutputError(f"{shown}: cannot create {folder} ({err.strerror or err})") from err
        created.append(folder)
    return created


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()


def _replace(tmp: Path, target: Path, shown) -> None:
    try:
        if not target.exists():
            os.rename(tmp, target)
            return
        old = Path(tempfile.mkdtemp(prefix=f".{target.name}.mlstep-old-", dir=target.parent))
        os.rename(target, old / "previous")
        try:
            os.rename(tmp, target)
        except OSError:
            os.rename(old / "previous", target)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except OSError as err:
        raise OutputError(f"{shown}: cannot move the result into place ({err.strerror or err})") from err


def _optimize(model_path: Path, options: OptimizeOptions):
    from mlstep.optimizer import optimize_file

    return optimize_file(model_path, options)


def build_variants(model, precisions: tuple[str, ...], directory: Path) -> tuple[dict[str, Path], dict[str, dict]]:
    """Save each variant as ``directory/<precision>/model.onnx``; return paths and fused-op counts.

    fp32 is the optimized model; fp16 is converted from it (a new model; the fp32 one is saved first).
    """
    from mlstep.optimizer import io
    from mlstep.optimizer.passes import count_fused_ops

    paths, fusions = {}, {}
    for name in precisions:
        variant = model
        if name == "fp16":
            from mlstep.precision import to_fp16

            variant = to_fp16(model, keep_io_types=True)
        paths[name] = io.save(variant, directory / name / MODEL_FILE)
        fusions[name] = dict(count_fused_ops(variant))
    return paths, fusions


def make_inputs(model_path: Path, settings: StepSettings):
    """Inputs synthesized from the source's signature (ids in vocab, masks padded right and left)."""
    from mlstep.optimizer import io
    from mlstep.validate.inputs import synthesize_inputs

    cases = synthesize_inputs(io.load(model_path), batch=settings.batch_size, sequence=settings.sequence_length)
    if not cases:
        raise BadInputError(f"{model_path}: could not synthesize inputs from the graph signature")
    return cases


def validate(model_path: Path, paths: dict[str, Path], cases, providers) -> dict:
    """Parity of every variant against the source run once under ORT_DISABLE_ALL."""
    from mlstep.validate.parity import check_parity, run_reference

    reference = run_reference(model_path, cases, providers=providers)
    return {name: check_parity(model_path, path, name, cases, providers=providers, reference_outputs=reference)
            for name, path in paths.items()}


def benchmark(model_path: Path, paths: dict[str, Path], feeds, providers, settings: StepSettings):
    """Latency of the source (the baseline) and of each variant, same feeds, same process."""
    from mlstep.bench import measure

    def one(path):
        return measure(path, feeds, providers, warmup=settings.warmup, repeat=settings.repeat)

    baseline = one(model_path)
    return baseline, {name: one(path) for name, path in paths.items()}


# ---------------------------------------------------------------------------------------------- helpers

def _providers(use_gpu: bool) -> list[str]:
    from mlstep.validate.parity import providers

    return providers(use_gpu)


def _source_text(source, model_path: Path) -> str:
    text = os.fspath(source)
    return scrub(text) if "://" in text or text.startswith(MLFLOW_SCHEMES) else str(model_path.resolve())


def _options_dict(options: OptimizeOptions, settings: StepSettings) -> dict[str, Any]:
    values = dataclasses.asdict(options)
    values["disabled_fusions"] = sorted(options.disabled_fusions)
    return {**values, **settings.as_dict(), "options_hash": options.hash()}


def _fusion_text(fusions: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(fusions.items())) or "no fusions applied"


@contextlib.contextmanager
def _stage(listener: Listener, name: str, detail: str = ""):
    notes: list[str] = []
    listener.start(name, detail)
    start = time.perf_counter()
    yield notes.append
    listener.done(name, time.perf_counter() - start, notes[-1] if notes else detail)
