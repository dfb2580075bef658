"""The local optimize step, as a list of stages.

    resolve source -> stage output folder -> optimize -> variants (fp32, fp16) -> inputs -> parity
    -> latency -> report [-> MLflow run + registration] -> move the output folder into place
    [-> GitHub job summary]

Each stage takes the previous stage's value. Everything is written to a temporary folder beside the
output folder (same filesystem) and renamed into place at the end: on any error nothing is left behind
and an existing output folder is untouched; on success an existing output folder is replaced.

A failed gate is a result, not a crash: the outputs and the report (which says what failed) are moved
into place and ``StepResult.passed`` is False; ``StepResult.check()`` then raises ``GateFailedError``
(exit 1). The CLI prints its summary first, then calls ``check()``.

MLflow (``mlstep.registry``): the source may be ``runs:/``, ``models:/`` (version, alias, LoggedModel id);
it is resolved to a concrete version and downloaded to a temporary folder that lives until the step ends.
With registration on (an MLflow source, or ``PublishSettings.register_as``; never with ``register=False``)
the step logs one MLflow run and registers each variant that passed every gate; the report then names the
versions (``variants.*.registered``). A store that fails part-way still gets the outputs moved into place
(the report says what was registered) and then raises ``RegistryError`` (exit 2). Without registration
nothing is written to MLflow. When ``GITHUB_STEP_SUMMARY`` is set, report.md is appended to it.

Library use::

    from mlstep.optimizer import OptimizeOptions
    from mlstep.step import PublishSettings, StepSettings, run
    result = run("model.onnx", "out", OptimizeOptions(num_heads=12), StepSettings(precisions=("fp32",)))
    result.report["variants"]["fp32"]["fusions"], result.passed
    run("models:/bert@candidate", "out")                         # registers the passing variants
    run("model.onnx", "out", publish=PublishSettings(register_as="bert"))
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

from mlstep import registry
from mlstep.errors import BadInputError, GateFailedError, OutputError, RegistryError, UsageError
from mlstep.optimizer.options import OptimizeOptions
from mlstep.report import VariantFacts, build_report, failed_gates, gates_passed, scrub, write_report

PRECISIONS = ("fp32", "fp16")
MODEL_FILE = "model.onnx"
LATENCY_DIR = "latency"        # the gates' benchmark.json, gates.json, latency.png
MLFLOW_SCHEMES = registry.MLFLOW_SCHEMES
STAGES = ("resolve", "optimize", "variants", "inputs", "parity", "latency", "report", "register", "commit")
REPORT_FILES = ("report.json", "report.md")
SUMMARY_ENV = "GITHUB_STEP_SUMMARY"


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
    gate_fp16_on_cpu: bool = False         # fp16 timed on the CPU is reported, not gated, unless this is set

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
                "max_slowdown": self.max_slowdown, "min_speedup": self.min_speedup, "require_gpu": self.require_gpu,
                "gate_fp16_on_cpu": self.gate_fp16_on_cpu}


@dataclass(frozen=True)
class PublishSettings:
    """What the step writes to MLflow.

    Registration is on for an MLflow source (into the source's registered model) or with ``register_as``
    (any source); ``register=False`` is a dry run that writes nothing to MLflow. ``aliases`` maps a
    variant to the alias its registered version gets ("" or a missing entry: no alias).
    """

    register: bool = True
    register_as: str | None = None
    aliases: tuple[tuple[str, str], ...] = tuple(registry.DEFAULT_ALIASES.items())
    experiment: str | None = None          # default: MLFLOW_EXPERIMENT_NAME, else "mlstep"

    def checked(self) -> "PublishSettings":
        for variant, alias in self.aliases:
            if variant not in PRECISIONS:
                raise UsageError(f"alias for unknown variant {variant!r} (choose from {', '.join(PRECISIONS)})")
            if alias:
                registry.check_alias(alias)
        if self.register_as is not None and not self.register_as.strip():
            raise UsageError("--register-as needs a model name")
        if self.register_as is not None:
            registry.check_name(self.register_as, "--register-as name")
        return self

    @property
    def alias_map(self) -> dict[str, str]:
        return {variant: alias for variant, alias in self.aliases if alias}


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
        settings: StepSettings = StepSettings(), listener: Listener | None = None,
        publish: PublishSettings = PublishSettings()) -> StepResult:
    """Run the whole step; see the module docstring."""
    listener = listener or _Quiet()
    settings = settings.checked()
    publish = publish.checked()
    # The CLI's --precision decides the fp16 variant; the option records it (and joins the options hash).
    options = dataclasses.replace(options, float16="fp16" in settings.precisions).validate()
    if settings.require_gpu:                      # fail before any work, not after optimizing on the CPU
        from mlstep.bench.gates import require_cuda
        require_cuda()

    with contextlib.ExitStack() as stack:
        with _stage(listener, "resolve", scrub(os.fspath(source))) as note:
            resolved, store, register_as = _resolve(source, publish, stack)
            model_path = resolved.local_path
            note(resolved.describe() + (f" (register as {register_as})" if register_as else ""))
            if Path(output_dir).expanduser().resolve() in model_path.resolve().parents:
                raise UsageError(f"{model_path}: the source lies inside the output folder {output_dir}, "
                                 "which this run replaces; choose another --output")
        registry_error = None
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
            fusion_log = optimized.log if options.verbose else None
            with _stage(listener, "report"):
                facts = {name: VariantFacts(path=f"{name}/{MODEL_FILE}", fusions=fusions[name],
                                            parity=parity.get(name), latency=latency.get(name), baseline=baseline)
                         for name in settings.precisions}
                report = build_report(source=_source_text(source, model_path),
                                      model_type=optimized.detected.model_type,
                                      num_heads=optimized.detected.num_heads,
                                      hidden_size=optimized.detected.hidden_size,
                                      options=_options_dict(options, settings), variants=facts,
                                      optimizer_seconds=optimized.seconds,
                                      mlflow=registry.record(store, resolved, register_as) if store else None)
                if gates is not None:
                    from mlstep.bench.gates import apply_to_report
                    apply_to_report(report, gates)   # gate.latency passed|failed, gate.passed (before registering)
                if not register_as:
                    write_report(report, tmp, fusion_log=fusion_log)
            if register_as:
                with _stage(listener, "register", register_as) as note:
                    pub = registry.publish(store, registry.request_from_report(
                        report, resolved, paths, register_as=register_as, aliases=publish.alias_map,
                        experiment=publish.experiment))
                    _record_publication(report, store, resolved, register_as, pub)
                    files = write_report(report, tmp, fusion_log=fusion_log)
                    had_error = pub.error
                    pub = registry.finish(store, pub, files, evidence_files(tmp), gates_passed(report))
                    if pub.error != had_error:          # the report says what the store kept
                        _record_publication(report, store, resolved, register_as, pub)
                        write_report(report, tmp, fusion_log=fusion_log)
                    if pub.error:
                        registry_error = RegistryError(pub.message())
                    note(_registration_text(report))
            listener.start("commit", str(output_dir))
            committing = time.perf_counter()
        listener.done("commit", time.perf_counter() - committing, str(output_dir))
    append_job_summary(Path(output_dir) / "report.md")
    if registry_error is not None:
        raise RegistryError(f"{registry_error} (outputs and report: {output_dir})")
    return StepResult(report, gates_passed(report), Path(output_dir), list(optimized.log),
                      gates.moved(tmp, output_dir) if gates is not None else None)


def _resolve(source, publish: PublishSettings, stack: contextlib.ExitStack):
    """(Resolved, the MLflow store or None, the registered model name to register under or None)."""
    from_mlflow = registry.is_mlflow_uri(source)
    if from_mlflow:
        registry.parse_uri(os.fspath(source))      # a malformed URI fails before any store is touched
    wants_registration = publish.register and (from_mlflow or bool(publish.register_as))
    store = None
    if from_mlflow or wants_registration:
        store = registry.Store()
        if not from_mlflow:
            store.ping()                 # a dead server fails now, not after the optimizer's minutes
    resolved = stack.enter_context(registry.materialize(source, store, identify_local=wants_registration))
    register_as = None
    if wants_registration:
        register_as = publish.register_as or resolved.name
        if not register_as:
            raise UsageError(f"{resolved.uri}: no registered model to add the variants to; "
                             "pass --register-as NAME (or --no-register)")
    return resolved, store, register_as


def _record_publication(report: dict, store, resolved, register_as: str, pub) -> None:
    """The registry's result into the report: the ``mlflow`` section and ``variants.*.registered``."""
    report["mlflow"] = registry.record(store, resolved, register_as, pub)
    for name, facts in report["variants"].items():
        reg = pub.registrations.get(name)
        facts["registered"] = reg.uri if reg is not None else None


def evidence_files(directory: Path) -> dict[Path, str | None]:
    """Files besides the variants and the report (benchmark JSON, plots, gate results) -> artifact folder."""
    out = {}
    for path in sorted(directory.rglob("*")):
        rel = path.relative_to(directory)
        if path.is_file() and rel.parts[0] not in PRECISIONS and str(rel) not in REPORT_FILES:
            parent = rel.parent.as_posix()
            out[path] = "evidence" if parent == "." else f"evidence/{parent}"
    return out


def append_job_summary(report_md: Path) -> None:
    """Append report.md to the GitHub job summary file when ``GITHUB_STEP_SUMMARY`` names one."""
    target = os.environ.get(SUMMARY_ENV, "").strip()
    if not target or not report_md.is_file():
        return
    with contextlib.suppress(OSError):
        with open(target, "a", encoding="utf-8") as f:
            f.write(report_md.read_text(encoding="utf-8").rstrip("\n") + "\n\n")


# ----------------------------------------------------------------------------------------------- stages

def resolve_source(source: str | os.PathLike) -> Path:
    """The local ``.onnx`` file of a local source (a file, an MLflow model directory or its ``MLmodel``).

    MLflow URIs are resolved (and downloaded) by ``mlstep.registry.materialize``, which ``run`` uses.
    """
    return registry.resolve_local(source)


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


def _registration_text(report: dict) -> str:
    regs = (report.get("mlflow") or {}).get("registrations") or {}
    parts = [f"{name} {r['uri']}" + (" (existing)" if r["status"] == "existing" else "") if r.get("uri")
             else f"{name} {r['status']}" for name, r in regs.items()]
    return ", ".join(parts) or "nothing registered"


def _fusion_text(fusions: dict[str, int]) -> str:
    return ", ".join(f"{op} {n}" for op, n in sorted(fusions.items())) or "no fusions applied"


@contextlib.contextmanager
def _stage(listener: Listener, name: str, detail: str = ""):
    notes: list[str] = []
    listener.start(name, detail)
    start = time.perf_counter()
    yield notes.append
    listener.done(name, time.perf_counter() - start, notes[-1] if notes else detail)
