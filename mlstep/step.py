"""The optimize step, a coordinator: each stage takes what the one before produced and edits nothing.

    resolve -> optimize -> forms -> variants -> verify (parity, latency) -> decide -> report -> publish -> commit

- resolve (:mod:`mlstep.registry`): the source (a file, an MLflow model directory, ``runs:/``,
  ``models:/``) made local; the model loaded and checked (not ONNX, external data escaping, ONNX Runtime
  refusing it: exit 2 before anything is written); the output guard taken (:mod:`mlstep.outdir`).
- optimize (:mod:`mlstep.optimizer`): fusions, with per-kind block coverage.
- forms (:mod:`mlstep.forms`): the fused form, attention left unfused, no fusion: each parity-checked and
  timed interleaved at the gated shape on the target provider; the fastest passing form becomes the variants
  (``StepSettings.form``: ``auto`` measures; a form name forces it; off with --skip-benchmark or
  --skip-validation, which keep the fused form).
- variants (:mod:`mlstep.variants`): fp32 / fp16 written into the staging folder, each load-checked in ONNX
  Runtime (a variant that does not load is mlstep's bug: exit 3, the model kept aside).
- verify: parity at the user's shapes, a long sequence and, with past, past {1, 17} x new {1, 8}
  (:mod:`mlstep.validate.parity`); latency by the pytest-benchmark gates (:mod:`mlstep.bench.gates`).
- decide (:mod:`mlstep.gates`): typed verdicts per variant: parity, latency, coverage.
- report (:mod:`mlstep.report`): report.json / report.md rendered once from facts + verdicts.
- publish (:mod:`mlstep.registry`): with registration on, one MLflow run and the variants that passed
  every gate registered; the report is rendered when the registrations are known.
- commit (:mod:`mlstep.outdir`): the guard re-checked, the staging folder renamed into place.

A failed gate is a result, not a crash: the outputs and the report (which says what failed) are moved into
place and ``StepResult.passed`` is False; ``StepResult.check()`` then raises ``GateFailedError`` (exit 1).
SIGINT / SIGTERM / SIGHUP remove the staging and temporary folders and raise ``Interrupted`` (exit 130 /
143 / 129). A store that fails part-way still gets the outputs moved into place (the report says what was
registered) and then raises ``RegistryError`` (exit 2). When ``GITHUB_STEP_SUMMARY`` is set, report.md is
appended to it.

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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mlstep import forms, gates, outdir, registry, report, runtime
from mlstep.errors import GateFailedError, RegistryError, UsageError
from mlstep.optimizer.fusions._base import UNSPECIFIED_PADDING
from mlstep.optimizer.options import OptimizeOptions
from mlstep.redact import scrub
from mlstep.variants import MODEL_FILE, PRECISIONS

LATENCY_DIR = "latency"        # the gates' benchmark.json, gates.json, latency.png
MLFLOW_SCHEMES = registry.MLFLOW_SCHEMES
STAGES = ("resolve", "optimize", "forms", "variants", "parity", "latency", "report", "register", "commit")
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
    max_slowdown: float = 0.05             # latency gate: variant <= source x (1 + max_slowdown), noise-aware
    min_speedup: float | None = None       # latency gate (optional): source / variant >= this
    require_gpu: bool = False              # exit 2 unless CUDA loads: a GPU job never measures the CPU by accident
    gate_fp16_on_cpu: bool = False         # fp16 timed on the CPU is reported, not gated, unless this is set
    allow_partial_fusion: bool = False     # coverage gate: accept detected blocks that stayed unfused
    remeasure: int = 2                     # latency gate: re-measurements of a borderline result
    form: str = "auto"                     # auto: measure the forms (mlstep.forms); or one of forms.FORMS

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
        from mlstep.forms import AUTO, FORMS
        if self.form not in (AUTO, *FORMS):
            raise UsageError(f"unknown form {self.form!r} (choose from {', '.join((AUTO, *FORMS))})")
        # Keep the order of PRECISIONS and drop repeats: "--precision fp16 --precision fp32 --precision fp16".
        return dataclasses.replace(self, precisions=tuple(p for p in PRECISIONS if p in self.precisions))

    def as_dict(self) -> dict[str, Any]:
        return {"precision": list(self.precisions), "skip_validation": not self.validate,
                "skip_benchmark": not self.benchmark, "batch_size": self.batch_size,
                "sequence_length": self.sequence_length, "warmup": self.warmup, "repeat": self.repeat,
                "max_slowdown": self.max_slowdown, "min_speedup": self.min_speedup, "require_gpu": self.require_gpu,
                "gate_fp16_on_cpu": self.gate_fp16_on_cpu, "allow_partial_fusion": self.allow_partial_fusion,
                "form": self.form}


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
    verdicts: dict[str, gates.VariantVerdicts]
    output_dir: Path
    fusion_log: list = field(default_factory=list)     # optimizer FusionLog entries (what fused, what was refused)
    gates: Any = None        # mlstep.bench.gates.GateResults (files under output_dir/latency/) or None when skipped
    warnings: list[str] = field(default_factory=list)  # detected blocks that stayed unfused, one line per kind

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.verdicts.values())

    @property
    def no_fusions(self) -> bool:
        return not any(v["fusions"] for v in self.report["variants"].values())

    def check(self) -> "StepResult":
        """Raise ``GateFailedError`` (exit 1) when a gate failed."""
        if not self.passed:
            raise GateFailedError(f"gate failed: {'; '.join(gates.failures(self.verdicts))} "
                                  f"(report: {self.output_dir / 'report.md'})")
        return self


def run(source: str | os.PathLike, output_dir: str | os.PathLike, options: OptimizeOptions = OptimizeOptions(),
        settings: StepSettings = StepSettings(), listener: Listener | None = None,
        publish: PublishSettings = PublishSettings()) -> StepResult:
    """Run the whole step; see the module docstring."""
    listener = listener or _Quiet()
    settings = settings.checked()
    publish = publish.checked()
    outdir.check_names(output_dir, "--output")
    if not registry.is_mlflow_uri(source):        # an MLflow URI's name is checked by registry.parse_uri
        outdir.check_names(source, "source")
    output_dir = Path(output_dir).expanduser().absolute()   # -o . stays meaningful after the commit's rename
    # The CLI's --precision decides the fp16 variant; the option records it (and joins the options hash).
    options = dataclasses.replace(options, float16="fp16" in settings.precisions).validate()
    with outdir.interruptible():
        if settings.require_gpu:                      # fail before any work, not after optimizing on the CPU
            runtime.require_cuda()
        providers = runtime.providers(options.use_gpu or settings.require_gpu)
        with contextlib.ExitStack() as stack:
            with _stage(listener, "resolve", scrub(os.fspath(source))) as note:
                src = _resolve(source, output_dir, settings, publish, stack, providers)
                note(src.resolved.describe() + (f" (register as {src.register_as})" if src.register_as else ""))
            with outdir.staged_output(output_dir) as staging:
                result = _work(src, staging, output_dir, options, settings, publish, providers, listener)
                listener.start("commit", str(output_dir))
                committing = time.perf_counter()
            listener.done("commit", time.perf_counter() - committing, str(output_dir))
    append_job_summary(output_dir / "report.md")
    if result.registry_error is not None:
        raise RegistryError(f"{result.registry_error} (outputs and report: {output_dir})")
    return StepResult(result.report, result.verdicts, output_dir, result.fusion_log,
                      result.gates.moved(staging, output_dir) if result.gates is not None else None,
                      result.warnings)


@dataclass(frozen=True)
class _Source:
    resolved: Any                   # registry.Resolved
    text: str                       # the source as the report shows it (credentials scrubbed)
    model: Any                      # the source as onnx_ir.Model (checked; optimized in place later)
    precision: str                  # fp32 | fp16 (mlstep.variants.source_precision)
    cases: list                     # parity cases, synthesized before the model is optimized
    store: Any
    register_as: str | None


@dataclass
class _Work:
    report: dict
    verdicts: dict
    fusion_log: list
    gates: Any
    warnings: list[str]
    registry_error: RegistryError | None = None


def _work(src: _Source, staging: Path, output_dir: Path, options: OptimizeOptions, settings: StepSettings,
          publish: PublishSettings, providers: list[str], listener) -> _Work:
    from mlstep import variants as variant_builder

    model_path = src.resolved.local_path
    names, notes = variant_builder.plan(settings.precisions, src.precision)
    with _stage(listener, "optimize", model_path.name) as note:
        optimized = _optimize(src.model, options, model_path, (settings.sequence_length,))
        note(_fusion_text(optimized.fusions))
    notes = list(notes) + list(optimized.detected.notes)     # options the graph overruled
    warnings = gates.unfused_warnings(optimized.coverage)
    with _stage(listener, "forms") as note:
        selection = _select_form(src, optimized, options, settings, providers, staging)
        note(f"{selection.chosen}" + (f" ({_form_text(selection)})" if selection.measured else ""))
    if UNSPECIFIED_PADDING in selection.candidate(selection.chosen).model.metadata_props:
        notes += optimized.notes                              # the chosen form leaves padded rows unspecified
    with _stage(listener, "variants", ", ".join(names)):
        paths, fusions = variant_builder.build_variants(selection.candidate(selection.chosen).model, names, staging,
                                                        source=src.precision)
        for name, path in paths.items():
            runtime.load_check(path, name, providers)
        precision = {name: variant_builder.precision_facts(path) for name, path in paths.items()}
    parity, latency = {}, None
    if settings.validate:
        with _stage(listener, "parity", f"{len(src.cases)} cases") as note:
            parity, skipped = validate(model_path, paths, src.cases, providers)
            notes = list(notes) + skipped
            note(", ".join(f"{n} {'ok' if r.passed else 'FAILED'} ({r.max_abs_diff:.1e})" for n, r in parity.items()))
    if settings.benchmark:
        with _stage(listener, "latency") as note:
            latency = _latency(model_path, paths, settings, options, staging / LATENCY_DIR)
            note(", ".join(f"{n} {g.median_ms:.2f} ms" for n, g in latency.variants.items())
                 + f" (source {latency.baseline.median_ms:.2f} ms, {latency.provider})")
    coverage = gates.coverage_verdict(optimized.coverage, settings.allow_partial_fusion)
    verdicts = {name: gates.decide(parity.get(name), latency.variants.get(name) if latency else None, coverage)
                for name in names}
    facts = report.RunFacts(
        source=src.text,
        model_type=optimized.detected.model_type, num_heads=optimized.detected.num_heads,
        hidden_size=optimized.detected.hidden_size, options=_options_dict(options, settings),
        optimizer_seconds=optimized.seconds, coverage=dict(optimized.coverage), notes=notes,
        runtime={"providers": list(providers), "use_gpu": options.use_gpu,
                 "gpu_fallback": runtime.gpu_fallback(options.use_gpu)},
        forms=selection.as_dict(),
        variants={name: report.VariantFacts(path=f"{name}/{MODEL_FILE}", fusions=fusions[name],
                                            parity=parity.get(name),
                                            latency=latency.variants.get(name) if latency else None,
                                            baseline=latency.baseline if latency else None,
                                            precision=precision[name])
                  for name in names},
        mlflow=registry.record(src.store, src.resolved, src.register_as) if src.store else None)
    fusion_log = optimized.log if options.verbose else None
    error = None
    if src.register_as:
        with _stage(listener, "register", src.register_as) as note:
            rendered, error = _publish(src, facts, verdicts, coverage, paths, staging, publish, fusion_log)
            note(_registration_text(rendered))
    else:
        with _stage(listener, "report"):
            rendered = report.render(facts, verdicts, coverage, staging, fusion_log)
    return _Work(rendered, verdicts, list(optimized.log), latency, warnings, error)


def _publish(src: _Source, facts, verdicts, coverage, paths, staging: Path, publish: PublishSettings,
             fusion_log) -> tuple[dict, RegistryError | None]:
    """Log the run and register the passing variants; render the report once the registrations are known.

    The one place the step talks to the registry's publishing::

        publish (run, params, metrics, registrations)  ->  render (facts + verdicts + publication)
        -> finish (the rendered report and the evidence logged with the run, mlstep.gates tagged)
        -> render again only when finish changed what the store kept (the report says what MLflow holds)

    ``registry.publish`` never raises for the store: its ``Publication.error`` becomes the returned
    ``RegistryError`` (exit 2 once the outputs are in place).
    """
    draft = report.build(facts, verdicts, coverage)       # the request reads options, figures and gate.passed
    request = registry.request_from_report(draft, src.resolved, paths, register_as=src.register_as,
                                           aliases=publish.alias_map, experiment=publish.experiment)
    params, metrics = forms.mlflow_fields(draft.get("forms"))   # the form choice and its timings in the run
    request = dataclasses.replace(request, params={**request.params, **params},
                                  metrics={**request.metrics, **metrics})
    pub = registry.publish(src.store, request)
    recorded = registry.record(src.store, src.resolved, src.register_as, pub)
    rendered = report.render(_published(facts, recorded, pub), verdicts, coverage, staging, fusion_log)
    pub = registry.finish(src.store, pub, [staging / name for name in REPORT_FILES], evidence_files(staging),
                          gates_passed=all(v.passed for v in verdicts.values()))
    after = registry.record(src.store, src.resolved, src.register_as, pub)
    if after != recorded:                 # finish failed: the local report says what the store kept
        rendered = report.render(_published(facts, after, pub), verdicts, coverage, staging, fusion_log)
    return rendered, RegistryError(pub.message()) if pub.error else None


def _published(facts: report.RunFacts, recorded: dict, pub) -> report.RunFacts:
    """The facts with the publication: the ``mlflow`` section and each variant's registered version."""
    return dataclasses.replace(facts, mlflow=recorded, variants={
        name: dataclasses.replace(v, registered=pub.registrations[name].uri if name in pub.registrations else None)
        for name, v in facts.variants.items()})


def _resolve(source, output_dir: Path, settings: StepSettings, publish: PublishSettings,
             stack: contextlib.ExitStack, providers: list[str]) -> _Source:
    """Resolve and check the source before anything is written: one line, exit 2, on bad input."""
    from mlstep import variants
    from mlstep.optimizer import io

    from_mlflow = registry.is_mlflow_uri(source)
    if from_mlflow:
        registry.parse_uri(os.fspath(source))      # a malformed URI fails before any store is touched
    wants_registration = publish.register and (from_mlflow or bool(publish.register_as))
    outdir.Guard.take(output_dir)                  # a foreign output folder is refused before any work
    store = None
    if from_mlflow or wants_registration:
        outdir.check_store_outside(output_dir, registry.tracking_uri())
        store = registry.Store(reading=os.fspath(source) if from_mlflow else None)
        if not from_mlflow:
            store.ping()                 # a dead server fails now, not after the optimizer's minutes
    resolved = stack.enter_context(registry.materialize(source, store, identify_local=wants_registration))
    register_as = None
    if wants_registration:
        register_as = publish.register_as or resolved.name
        if not register_as:
            raise UsageError(f"{resolved.uri}: no registered model to add the variants to; "
                             "pass --register-as NAME (or --no-register)")
    model_path = resolved.local_path
    if output_dir in model_path.resolve().parents or output_dir.resolve() in model_path.resolve().parents:
        raise UsageError(f"{model_path}: the source lies inside the output folder {output_dir}, "
                         "which this run replaces; choose another --output")
    model = io.load(model_path)                    # not ONNX, external data escaping: exit 2
    runtime.session(model_path, providers, runtime.DISABLE_ALL)   # ONNX Runtime refuses it: exit 2
    return _Source(resolved, _source_text(source, model_path), model, variants.source_precision(model),
                   _cases(model, model_path, settings), store, register_as)


def _cases(model, model_path: Path, settings: StepSettings) -> list:
    """Parity cases, synthesized from the source's signature before it is optimized (see ``parity_cases``)."""
    from mlstep.errors import BadInputError
    from mlstep.validate.parity import parity_cases

    if not settings.validate:
        return []
    cases = parity_cases(model, batch=settings.batch_size, sequence=settings.sequence_length)
    if not cases:
        raise BadInputError(f"{model_path.name}: could not synthesize inputs from the graph signature")
    return cases


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


def _optimize(model, options: OptimizeOptions, model_path: Path, sequence_lengths: tuple[int, ...]):
    from mlstep.optimizer import optimize

    return optimize(model, options, source_dir=model_path.parent, sequence_lengths=sequence_lengths)


def _select_form(src: _Source, optimized, options: OptimizeOptions, settings: StepSettings, providers: list[str],
                 staging: Path):
    """The form of the optimized model the variants are made from (see :mod:`mlstep.forms`).

    The candidates are written under ``staging/.forms`` and removed once chosen (the chosen one's model is kept
    in memory for the variants stage). Off (the fused form, not measured) with --skip-benchmark or
    --skip-validation: a form is chosen only on measurements, among forms proved to compute the same function.
    """
    import shutil

    fused = forms.Candidate(forms.FUSED, Path(), dict(optimized.fusions),
                            tuple(sorted(options.disabled_fusions)), optimized.model)
    if settings.form == forms.FUSED:
        return forms.not_measured([fused], "forced (form fused)")
    if settings.form == forms.AUTO and not (settings.benchmark and settings.validate):
        off = "--skip-benchmark" if not settings.benchmark else "--skip-validation"
        return forms.not_measured([fused], f"not measured ({off}): the fused form is kept")
    work = staging / ".forms"
    try:
        wanted = None if settings.form == forms.AUTO else (forms.FUSED, settings.form)
        candidates = forms.build_candidates(optimized.model, src.resolved.local_path, options, work, wanted)
        if settings.form != forms.AUTO:
            if not any(c.name == settings.form for c in candidates):
                return forms.not_measured(candidates, f"form {settings.form} is the fused form for this model "
                                                      "(nothing to leave unfused): fused kept")
            return forms.not_measured(candidates, f"forced (form {settings.form})", chosen=settings.form)
        cases = []
        if src.cases:
            from mlstep.validate.parity import runnable_cases
            cases, reference, _ = runnable_cases(src.resolved.local_path, src.cases, providers=providers)
        select = forms.SelectSettings(shapes=((settings.batch_size, settings.sequence_length),))
        return forms.select(src.resolved.local_path, candidates, cases, providers, select,
                            reference_outputs=reference if cases else None)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _form_text(selection) -> str:
    return ", ".join(f"{name} {t.median_ms:.2f} ms" for name, shapes in selection.timings.items()
                     for t in shapes.values())


def validate(model_path: Path, paths: dict[str, Path], cases, providers) -> tuple[dict, list[str]]:
    """Parity of every variant against the source run once under ORT_DISABLE_ALL, on the cases the source can
    run; the notes say which synthesized cases the source itself refused."""
    from mlstep.validate.parity import check_parity, runnable_cases

    cases, reference, skipped = runnable_cases(model_path, cases, providers=providers)
    return {name: check_parity(model_path, path, name, cases, providers=providers, reference_outputs=reference)
            for name, path in paths.items()}, skipped


def _latency(model_path: Path, paths: dict[str, Path], settings: StepSettings, options: OptimizeOptions,
             directory: Path):
    from mlstep.bench.gates import GateSettings, run_gates

    return run_gates(model_path, paths, GateSettings.from_settings(settings, use_gpu=options.use_gpu),
                     output_dir=directory)


# ---------------------------------------------------------------------------------------------- helpers

def _source_text(source, model_path: Path) -> str:
    text = os.fspath(source)
    return scrub(text) if "://" in text or text.startswith(MLFLOW_SCHEMES) else str(model_path.resolve())


def _options_dict(options: OptimizeOptions, settings: StepSettings) -> dict[str, Any]:
    values = dataclasses.asdict(options)
    values["disabled_fusions"] = sorted(options.disabled_fusions)
    return {**values, **settings.as_dict(), "options_hash": options_hash(options, settings)}


def options_hash(options: OptimizeOptions, settings: StepSettings) -> str:
    """The options' part of the idempotency key: the optimizer's options and a forced form (``--form``; the default
    ``auto`` adds nothing, so a re-run whose measurement picks another form finds the version already registered)."""
    from mlstep.forms import AUTO

    return options.hash({"form": settings.form} if settings.form != AUTO else None)


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
