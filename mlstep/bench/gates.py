"""Latency gates: the baseline (the unoptimized source) and each variant timed by pytest-benchmark.

    results = run_gates("model.onnx", {"fp32": Path("out/fp32/model.onnx"), "fp16": ...},
                        GateSettings(batch_size=2, sequence_length=128), output_dir=Path("out/latency"))
    results.passed, results.variants["fp16"].speedup, results.json_path, results.plot_path

``run_gates`` writes a config (model paths, feeds as .npz, providers, warmup/repeat) into a temporary
folder and runs the shipped pytest module :mod:`mlstep.bench.gate_benchmarks` with ``pytest.main`` and the
pytest-benchmark plugin, in this process (same providers, same feeds for every model). pytest is isolated
from the caller's project: ``--rootdir`` and ``-c`` point at the temporary folder (an empty ini), plugin
autoloading is off (only pytest-benchmark is loaded), ``PYTEST_ADDOPTS`` is ignored, ``-p
no:cacheprovider`` (no ``.pytest_cache`` anywhere) and its output is captured (shown only in an error).

Into ``output_dir`` go ``benchmark.json`` (pytest-benchmark's own JSON, per-round data included),
``gates.json`` (the decisions: :meth:`GateResults.as_dict`) and ``latency.png`` (median per model, p95
whisker, the gate threshold as a line).

The decision is not made here: per variant the per-block samples of the variant and of the source go to
:func:`mlstep.gates.decide_latency` (paired ratios, a 95% interval, ``borderline`` when the interval
straddles the limit). A borderline variant is re-measured: the whole interleaved run is repeated (up to
``remeasure`` times) and its blocks are pooled with the earlier ones before the final decision.

Shapes: ``batch_size`` x ``sequence_length``; a model with past inputs (``past_*``) is timed as the seed
does, one new token on a past of ``past_sequence_length`` (default: ``sequence_length``).

Providers: CPU, or [CUDA, CPU] with ``use_gpu`` when CUDA loads (``mlstep.runtime.providers``). The
provider that actually ran (``session.get_providers()[0]``) is recorded; ``require_gpu`` raises
``BadInputError`` (exit 2) when CUDA did not load, before anything is timed, and again if a session fell
back to the CPU. On CUDA the runner uses IO binding (``mlstep.bench.latency.make_runner``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlstep import gates as verdicts
from mlstep.bench.latency import CPU, CUDA, LatencyStats, summarize
from mlstep.errors import BadInputError, MlstepError, UsageError
from mlstep.runtime import require_cuda

BASELINE = "baseline"
BENCHMARK_JSON = "benchmark.json"
GATES_JSON = "gates.json"
PLOT_PNG = "latency.png"
_PYTEST_LOCK = threading.Lock()     # pytest.main and the environment it reads are process-global


@dataclass(frozen=True)
class GateSettings:
    batch_size: int = 2
    sequence_length: int = 8
    past_sequence_length: int | None = None   # models with past inputs; None: sequence_length
    warmup: int = 5                           # untimed rounds per model
    repeat: int = 30                          # timed rounds per model (each round: `iterations` calls)
    max_slowdown: float = 0.05
    min_speedup: float | None = None
    use_gpu: bool = False
    require_gpu: bool = False
    threads: int = 0                          # intra-op threads; 0: ORT's default
    blocks: int = 10                          # interleaved blocks the rounds are split into
    iterations: int = 0                       # calls per round; 0: calibrated (~target_round_ms per round)
    target_round_ms: float = 5.0
    seed: int = 0
    gate_fp16_on_cpu: bool = False            # fp16 on the CPU is timed but not gated unless asked
    remeasure: int = 2                        # extra interleaved runs when a decision is borderline

    @classmethod
    def from_settings(cls, settings: Any, **overrides) -> "GateSettings":
        """Take the fields of the same name from another settings object (e.g. ``mlstep.step.StepSettings``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {n: getattr(settings, n) for n in names if hasattr(settings, n)}
        return cls(**{**values, **overrides})

    def checked(self) -> "GateSettings":
        if self.batch_size < 1 or self.sequence_length < 1:
            raise UsageError("batch size and sequence length must be >= 1")
        if self.past_sequence_length is not None and self.past_sequence_length < 0:
            raise UsageError(f"past sequence length must be >= 0, got {self.past_sequence_length}")
        if self.warmup < 0 or self.repeat < 1:
            raise UsageError(f"warmup must be >= 0 and repeat >= 1 (got {self.warmup}, {self.repeat})")
        if not (self.max_slowdown >= 0 and math.isfinite(self.max_slowdown)):
            raise UsageError(f"max slowdown must be a finite number >= 0, got {self.max_slowdown}")
        if self.min_speedup is not None and not (self.min_speedup > 0 and math.isfinite(self.min_speedup)):
            raise UsageError(f"min speedup must be a finite number > 0, got {self.min_speedup}")
        if self.remeasure < 0:
            raise UsageError(f"remeasure must be >= 0, got {self.remeasure}")
        if self.threads < 0 or self.blocks < 1 or self.iterations < 0 or self.target_round_ms <= 0:
            raise UsageError("threads >= 0, blocks >= 1, iterations >= 0 and target_round_ms > 0 are required")
        return dataclasses.replace(self, blocks=min(self.blocks, self.repeat))


@dataclass(frozen=True)
class VariantGate:
    name: str
    median_ms: float
    p90_ms: float
    p95_ms: float
    mean_ms: float
    baseline_median_ms: float
    speedup: float                 # baseline median / variant median
    passed: bool
    reason: str                    # why it failed ("" when it passed)
    rounds: int
    provider: str
    gated: bool = True             # False: timed for information only (fp16 on the CPU)
    ratio_low: float = math.nan    # 95% interval of variant / source latency (mlstep.gates.ratio_interval)
    ratio_high: float = math.nan
    blocks: int = 0                # paired blocks the decision used

    @property
    def stats(self) -> LatencyStats:
        return LatencyStats(self.median_ms, self.p90_ms, self.p95_ms, self.mean_ms, self.provider)


@dataclass
class GateResults:
    provider: str                  # what actually ran (the same for every model, checked)
    io_binding: bool
    threads: int
    batch_size: int
    sequence_length: int
    past_sequence_length: int
    iterations: int                # calls per round
    max_slowdown: float
    min_speedup: float | None
    baseline: LatencyStats
    variants: dict[str, VariantGate]
    json_path: Path                # pytest-benchmark's JSON
    plot_path: Path | None         # None when matplotlib is not installed
    summary_path: Path             # gates.json
    extra: dict = field(default_factory=dict)
    measurements: int = 1          # interleaved runs pooled (1 + re-measurements of a borderline result)
    borderline: bool = False       # a gated variant's interval straddles the limit (not final)

    @property
    def passed(self) -> bool:
        return all(v.passed for v in self.variants.values())

    def failures(self) -> list[str]:
        return [f"{name}: {v.reason}" for name, v in self.variants.items() if not v.passed]

    def as_dict(self) -> dict:
        return {
            "provider": self.provider, "io_binding": self.io_binding, "threads": self.threads,
            "shape": {"batch_size": self.batch_size, "sequence_length": self.sequence_length,
                      "past_sequence_length": self.past_sequence_length},
            "iterations_per_round": self.iterations, "max_slowdown": self.max_slowdown,
            "min_speedup": self.min_speedup, "passed": self.passed, "measurements": self.measurements,
            "baseline": {k: v for k, v in self.baseline.as_dict().items()},
            "variants": {name: dataclasses.asdict(v) for name, v in self.variants.items()},
            "files": {"benchmark_json": self.json_path.name,
                      "plot": self.plot_path.name if self.plot_path else None},
        }

    def metrics(self) -> dict[str, float]:
        """Flat figures for a tracking run (``latency.fp32.median_ms``, ``latency.fp32.speedup``, ...)."""
        out = {f"latency.{BASELINE}.{k}": getattr(self.baseline, k)
               for k in ("median_ms", "p90_ms", "p95_ms", "mean_ms")}
        for name, v in self.variants.items():
            out.update({f"latency.{name}.{k}": float(getattr(v, k))
                        for k in ("median_ms", "p90_ms", "p95_ms", "mean_ms", "speedup")})
            out[f"latency.{name}.passed"] = float(v.passed)
        return out

    def moved(self, old_root: str | os.PathLike, new_root: str | os.PathLike) -> "GateResults":
        """The same results with file paths rebased (the step writes into a staging folder, then renames it)."""
        old, new = Path(old_root).absolute(), Path(new_root).absolute()

        def rebase(path):
            if path is None:
                return None
            path = Path(path).absolute()
            return new / path.relative_to(old) if old in path.parents else path

        return dataclasses.replace(self, json_path=rebase(self.json_path), plot_path=rebase(self.plot_path),
                                   summary_path=rebase(self.summary_path))


def has_past(model) -> bool:
    """True when the graph has past key/value inputs (decoder with cache)."""
    return any((v.name or "").lower().startswith("past") for v in model.graph.inputs if not v.is_initializer())


def shaped_feeds(model, batch: int, sequence: int, past: int | None = None, seed: int = 0) -> tuple[dict, dict]:
    """Feeds (no padding) for ``model`` and the shape they stand for.

    A model with past inputs gets one new token on a past of ``past`` (default ``sequence``), as in the
    seed's GPT-2 tables; any other model gets ``batch`` x ``sequence``.
    """
    from mlstep.validate.inputs import synthesize_inputs

    if has_past(model):
        new, past_len = 1, sequence if past is None else past
    else:
        new, past_len = sequence, 0
    cases = synthesize_inputs(model, batch=batch, sequence=new, seed=seed, past_sequence=past_len)
    if not cases:
        raise BadInputError("could not synthesize inputs from the graph signature")
    return cases[0].feeds, {"batch_size": batch, "sequence_length": new, "past_sequence_length": past_len}


def run_gates(source_path: str | os.PathLike, variants: Mapping[str, str | os.PathLike],
              settings: GateSettings = GateSettings(), output_dir: str | os.PathLike | None = None,
              feeds: Mapping[str, np.ndarray] | None = None) -> GateResults:
    """Time the source and every variant with pytest-benchmark; decide each variant's latency gate.

    ``output_dir`` (default: a new temporary folder, left for the caller) receives benchmark.json,
    gates.json and latency.png. ``feeds`` overrides the synthesized inputs.
    """
    from mlstep.optimizer import io as model_io
    from mlstep.runtime import providers as loadable_providers

    settings = settings.checked()
    if BASELINE in variants:
        raise UsageError(f"a variant cannot be named {BASELINE!r}")
    if not variants:
        raise UsageError("no variant to gate")
    if settings.require_gpu:
        require_cuda()
    providers = loadable_providers(settings.use_gpu or settings.require_gpu)
    source_path = Path(source_path)
    shape = {"batch_size": settings.batch_size, "sequence_length": settings.sequence_length,
             "past_sequence_length": settings.past_sequence_length or 0}
    if feeds is None:
        feeds, shape = shaped_feeds(model_io.load(source_path), settings.batch_size, settings.sequence_length,
                                    settings.past_sequence_length, settings.seed)
    out = Path(output_dir) if output_dir is not None else Path(tempfile.mkdtemp(prefix="mlstep-gates-"))
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / BENCHMARK_JSON
    models = [{"name": BASELINE, "path": str(source_path.absolute())}] + [
        {"name": name, "path": str(Path(path).absolute())} for name, path in variants.items()]

    work = Path(tempfile.mkdtemp(prefix="mlstep-gate-run-"))
    try:
        np.savez(work / "feeds.npz", **{k: np.asarray(v) for k, v in feeds.items()})
        config = {"models": models, "feeds": str(work / "feeds.npz"), "providers": providers,
                  "threads": settings.threads, "warmup": settings.warmup, "repeat": settings.repeat,
                  "blocks": settings.blocks, "iterations": settings.iterations,
                  "target_round_ms": settings.target_round_ms}
        (work / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        (work / "pytest.ini").write_text("[pytest]\n", encoding="utf-8")
        runs = []
        for attempt in range(1 + settings.remeasure):
            target = json_path if attempt == 0 else out / f"benchmark-remeasure-{attempt}.json"
            _run_pytest(work, target)
            runs.append(json.loads(target.read_text(encoding="utf-8")))
            results = _results(runs, [m["name"] for m in models], settings, shape, json_path, out)
            if not results.borderline:
                break
        results = _results(runs, [m["name"] for m in models], settings, shape, json_path, out, final=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if settings.require_gpu and results.provider != CUDA:
        raise BadInputError(f"--require-gpu: the sessions ran on {results.provider}, not {CUDA}")
    results.plot_path = plot_gates(results, out / PLOT_PNG)
    results.summary_path.write_text(json.dumps(results.as_dict(), indent=2) + "\n", encoding="utf-8")
    return results


# ------------------------------------------------------------------------------------------- internals

class _Failures:
    """pytest plugin: the first line of every failed or errored case (shown when the run fails)."""

    def __init__(self):
        self.lines: list[str] = []

    def pytest_runtest_logreport(self, report):
        if report.failed:
            crash = getattr(report.longrepr, "reprcrash", None)
            message = crash.message if crash is not None else str(report.longrepr)
            self.lines.append(message.strip().splitlines()[0] if message.strip() else report.nodeid)

    def pytest_collectreport(self, report):
        if report.failed:
            self.lines.append(str(report.longrepr).strip().splitlines()[-1])


def _run_pytest(work: Path, json_path: Path) -> None:
    import pytest
    import pytest_benchmark.plugin

    from mlstep.bench import gate_benchmarks

    args = [gate_benchmarks.__file__, "--rootdir", str(work), "-c", str(work / "pytest.ini"),
            "-p", "no:cacheprovider", "-q", "--no-header", "--capture=sys", "--import-mode=importlib",
            "-W", "ignore", "--benchmark-json", str(json_path), "--benchmark-disable-gc",
            "--benchmark-sort=name", "--benchmark-storage", f"file://{work / 'storage'}",
            "--basetemp", str(work / "tmp")]
    failures = _Failures()
    buffer = io.StringIO()
    env = {gate_benchmarks.CONFIG_ENV: str(work / "config.json"), "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1",
           "PYTEST_ADDOPTS": None,
           # pytest sets and removes this one; keep an outer pytest's value (run_gates inside a test).
           "PYTEST_CURRENT_TEST": os.environ.get("PYTEST_CURRENT_TEST")}
    with _PYTEST_LOCK, _environ(env), contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
        code = pytest.main(args, plugins=[pytest_benchmark.plugin, failures])
    if code == pytest.ExitCode.INTERRUPTED:       # pytest swallows Ctrl-C (and our signal handlers' raise)
        raise KeyboardInterrupt
    if code != 0 or not json_path.is_file():
        detail = "; ".join(dict.fromkeys(failures.lines)) or " ".join(buffer.getvalue().strip().splitlines()[-1:])
        raise MlstepError(f"latency gates: the benchmark run failed (pytest exit {int(code)}): {detail}")


@contextlib.contextmanager
def _environ(values: Mapping[str, str | None]):
    saved = {k: os.environ.get(k) for k in values}
    try:
        for key, value in values.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _results(runs: list[dict], names: list[str], settings: GateSettings, shape: dict, json_path: Path,
             out: Path, final: bool = False) -> GateResults:
    """Pool the runs' rounds per model and block (a re-measurement adds blocks) and decide each variant."""
    blocks: dict[str, dict[tuple[int, int], list[float]]] = {name: {} for name in names}
    info: dict[str, dict] = {}
    for run_index, data in enumerate(runs):
        for bench in data.get("benchmarks", []):
            extra = bench.get("extra_info", {})
            name = extra.get("model")
            if name in blocks:
                key = (run_index, int(extra.get("block", 0)))
                blocks[name].setdefault(key, []).extend(t * 1e3 for t in bench["stats"]["data"])
                info[name] = extra
    missing = [n for n in names if not blocks[n]]
    if missing:
        raise MlstepError(f"latency gates: no timings for {', '.join(missing)} in {json_path}")
    used = {info[n]["provider"] for n in names}
    if len(used) != 1:
        raise MlstepError(f"latency gates: models ran on different providers ({', '.join(sorted(used))})")
    provider = used.pop()
    keys = sorted(blocks[BASELINE])
    base = summarize([t for k in keys for t in blocks[BASELINE][k]], provider)
    variants, borderline = {}, False
    for name in names[1:]:
        rounds = [t for k in sorted(blocks[name]) for t in blocks[name][k]]
        stats = summarize(rounds, provider)
        paired = [k for k in keys if k in blocks[name]]
        decision = verdicts.decide_latency([blocks[BASELINE][k] for k in paired], [blocks[name][k] for k in paired],
                                           settings.max_slowdown, settings.min_speedup, final=final)
        gated = not (name == "fp16" and provider == CPU and not settings.gate_fp16_on_cpu)
        passed, reason = decision.state != verdicts.FAILED, decision.reason
        if not gated:   # the fp16 variant is the GPU's: on a CPU it is timed for information, not gated
            passed, reason = True, f"not gated on {CPU} (fp16 is the GPU variant; {reason})"
        elif decision.state == verdicts.BORDERLINE:
            borderline = True
        est = decision.estimate
        variants[name] = VariantGate(name, stats.median_ms, stats.p90_ms, stats.p95_ms, stats.mean_ms,
                                     base.median_ms, est.speedup if est else 0.0, passed,
                                     "" if decision.state == verdicts.PASSED and gated else reason,
                                     len(rounds), provider, gated, est.low if est else math.nan,
                                     est.high if est else math.nan, est.blocks if est else 0)
    first = info[BASELINE]
    return GateResults(provider=provider, io_binding=bool(first.get("io_binding")), threads=int(first["threads"]),
                       batch_size=shape["batch_size"], sequence_length=shape["sequence_length"],
                       past_sequence_length=shape["past_sequence_length"], iterations=int(first["iterations"]),
                       max_slowdown=settings.max_slowdown, min_speedup=settings.min_speedup, baseline=base,
                       variants=variants, json_path=json_path, plot_path=None, summary_path=out / GATES_JSON,
                       extra={"machine_info": runs[0].get("machine_info", {}), "datetime": runs[0].get("datetime")},
                       measurements=len(runs), borderline=borderline)


def plot_gates(results: GateResults, path: Path) -> Path | None:
    """Bars: median per model (p95 whisker); a dashed line at the gate's threshold. None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    names = [BASELINE] + list(results.variants)
    stats = [results.baseline] + [v.stats for v in results.variants.values()]
    medians = [s.median_ms for s in stats]
    upper = [max(0.0, s.p95_ms - s.median_ms) for s in stats]
    colors = ["#8c8c8c"] + ["#2ca02c" if v.passed else "#d62728" for v in results.variants.values()]
    fig = Figure(figsize=(1.6 + 1.3 * len(names), 3.6), dpi=110)
    ax = fig.add_subplot()
    bars = ax.bar(names, medians, yerr=[[0] * len(names), upper], color=colors, capsize=4)
    ax.axhline(results.baseline.median_ms * (1 + results.max_slowdown), ls="--", lw=1, color="#444",
               label=f"gate: baseline x {1 + results.max_slowdown:g}")
    for bar, name, up in zip(bars, names, upper):
        label = "" if name == BASELINE else f"{results.variants[name].speedup:.2f}x"
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height() + up), ha="center", va="bottom",
                    fontsize=8, xytext=(0, 2), textcoords="offset points")
    shape = f"batch {results.batch_size}, sequence {results.sequence_length}"
    if results.past_sequence_length:
        shape += f", past {results.past_sequence_length}"
    ax.set_title(f"median latency ({shape}; {results.provider.replace('ExecutionProvider', '')})", fontsize=9)
    ax.set_ylabel("ms (whisker: p95)")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    return path


__all__ = ["BASELINE", "GateResults", "GateSettings", "VariantGate", "has_past", "plot_gates", "require_cuda",
           "run_gates", "shaped_feeds"]
