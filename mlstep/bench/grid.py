"""``mlstep benchmark``: latency over batch x sequence for several engines, in the seed's table shape.

Engines (rows: engine / precision / batch; columns: ``s=`` sequence length, or ``past=`` for a model with
past inputs, timed with one new token on that past, as the seed's GPT-2 tables):

- ``onnxruntime (source)`` fp32: the unoptimized model (the baseline);
- ``onnxruntime (mlstep)`` fp32 and fp16: the variants, optimized in this process
  (``optimize_file`` + ``to_fp16``, the same code as ``mlstep optimize``) and saved to a temporary folder;
- ``torch (eager)`` fp32 (and fp16 on CUDA) when a transformers model is given (a folder with a
  ``config.json``: pretrained weights when the folder has them, else random weights; or a config JSON file:
  random weights). Models with past inputs are not timed in torch (no cache mapping yet).

Each cell: ``warmup`` untimed calls, then ``repeat`` timed calls (median/p90/p95/mean of the per-call
times). ORT sessions use the default optimization level; on CUDA they are timed with IO binding
(``mlstep.bench.latency.make_runner``), torch with a device synchronize after each call. The intra-op
threads of ORT and torch are recorded with every cell.

    result = run_grid("model.onnx", GridSettings(batch_sizes=(1, 4), sequence_lengths=(32, 128)))
    print(result.markdown()); result.write(Path("bench-out"))
"""
from __future__ import annotations

import csv
import dataclasses
import inspect
import json
import platform
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlstep.errors import BadInputError, UsageError

ORT_SOURCE = "onnxruntime (source)"
ORT_MLSTEP = "onnxruntime (mlstep)"
TORCH_EAGER = "torch (eager)"
FILES = {"markdown": "benchmark.md", "csv": "benchmark.csv", "json": "benchmark.json", "plot": "latency.png"}
CSV_FIELDS = ["engine", "precision", "batch_size", "sequence_length", "past_sequence_length", "median_ms",
              "p90_ms", "p95_ms", "mean_ms", "provider", "threads", "io_binding"]

Progress = Callable[[int, int, str], None]      # (done, total, what is running)


@dataclass(frozen=True)
class GridSettings:
    batch_sizes: tuple[int, ...] = (1,)
    sequence_lengths: tuple[int, ...] = (8, 16, 32)
    past_sequence_lengths: tuple[int, ...] = ()     # models with past inputs; default: sequence_lengths
    precisions: tuple[str, ...] = ("fp32", "fp16")
    warmup: int = 5
    repeat: int = 30
    use_gpu: bool = False
    threads: int = 0                                # intra-op threads (ORT and torch); 0: their defaults
    torch_model: str | None = None
    seed: int = 0

    def checked(self) -> "GridSettings":
        if not self.batch_sizes or not self.sequence_lengths:
            raise UsageError("at least one batch size and one sequence length are needed")
        if min(self.batch_sizes) < 1 or min(self.sequence_lengths) < 1:
            raise UsageError("batch sizes and sequence lengths must be >= 1")
        if self.past_sequence_lengths and min(self.past_sequence_lengths) < 0:
            raise UsageError("past sequence lengths must be >= 0")
        if self.warmup < 0 or self.repeat < 1 or self.threads < 0:
            raise UsageError(f"warmup >= 0, repeat >= 1 and threads >= 0 are required "
                             f"(got {self.warmup}, {self.repeat}, {self.threads})")
        unknown = [p for p in self.precisions if p not in ("fp32", "fp16")]
        if unknown:
            raise UsageError(f"unknown precision {unknown[0]!r} (choose from fp32, fp16)")
        return dataclasses.replace(
            self, batch_sizes=tuple(dict.fromkeys(self.batch_sizes)),
            sequence_lengths=tuple(dict.fromkeys(self.sequence_lengths)),
            past_sequence_lengths=tuple(dict.fromkeys(self.past_sequence_lengths)),
            precisions=tuple(p for p in ("fp32", "fp16") if p in self.precisions))


@dataclass(frozen=True)
class Cell:
    engine: str
    precision: str
    batch_size: int
    sequence_length: int
    past_sequence_length: int
    median_ms: float
    p90_ms: float
    p95_ms: float
    mean_ms: float
    provider: str
    threads: int
    io_binding: bool


@dataclass
class GridResult:
    source: str
    has_past: bool
    cells: list[Cell]
    settings: GridSettings
    environment: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)

    @property
    def column_key(self) -> str:
        """``s`` (sequence length) or ``past`` (past length, one new token)."""
        return "past" if self.has_past else "s"

    def columns(self) -> list[int]:
        values = (c.past_sequence_length if self.has_past else c.sequence_length for c in self.cells)
        return list(dict.fromkeys(values))

    def rows(self) -> list[tuple[str, str, int]]:
        return list(dict.fromkeys((c.engine, c.precision, c.batch_size) for c in self.cells))

    def table(self) -> tuple[list[str], list[list[str]]]:
        """The seed's shape: engine / precision / batch rows, ``s=`` columns, median ms in the cells."""
        columns = self.columns()
        header = ["engine", "precision", "batch"] + [f"{self.column_key}={c}" for c in columns]
        index = {(c.engine, c.precision, c.batch_size,
                  c.past_sequence_length if self.has_past else c.sequence_length): c for c in self.cells}
        rows = []
        for engine, precision, batch in self.rows():
            cells = [index.get((engine, precision, batch, col)) for col in columns]
            rows.append([engine, precision, str(batch)] + [f"{c.median_ms:.2f}" if c else "-" for c in cells])
        return header, rows

    def caption(self) -> str:
        env = self.environment
        what = "past length, one new token" if self.has_past else "sequence length"
        parts = [f"median ms over {self.settings.repeat} calls ({self.settings.warmup} warm-up); columns: {what}",
                 f"provider {env.get('provider', '?')}" + (" with IO binding" if env.get("io_binding") else ""),
                 f"onnxruntime {env.get('onnxruntime', '?')}, {env.get('ort_threads', '?')} intra-op threads"]
        if env.get("torch"):
            parts.append(f"torch {env['torch']}, {env.get('torch_threads', '?')} threads")
        parts.append(env.get("cpu") or platform.machine())
        return "; ".join(parts)

    def markdown(self) -> str:
        header, rows = self.table()

        def row(cells):
            return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

        lines = [f"# mlstep benchmark: `{self.source}`", "", row(header),
                 "|" + "|".join(":--" if i < 2 else "--:" for i in range(len(header))) + "|",
                 *(row(r) for r in rows), "", self.caption(), ""]
        return "\n".join(lines)

    def as_dict(self) -> dict:
        settings = dataclasses.asdict(self.settings)
        return {"source": self.source, "has_past": self.has_past, "settings": settings,
                "environment": self.environment, "results": [dataclasses.asdict(c) for c in self.cells]}

    def metrics(self) -> dict[str, float]:
        """``latency_ms.<engine>.<precision>.b<batch>.<s|past><n>`` -> median, for a tracking run."""
        out = {}
        for c in self.cells:
            engine = c.engine.replace(" (", "_").replace(")", "").replace(" ", "_")
            col = c.past_sequence_length if self.has_past else c.sequence_length
            out[f"latency_ms.{engine}.{c.precision}.b{c.batch_size}.{self.column_key}{col}"] = c.median_ms
        return out

    def params(self) -> dict[str, str]:
        s = self.settings
        return {"source": self.source, "batch_sizes": ",".join(map(str, s.batch_sizes)),
                "sequence_lengths": ",".join(map(str, s.sequence_lengths)),
                "past_sequence_lengths": ",".join(map(str, s.past_sequence_lengths)),
                "precisions": ",".join(s.precisions), "warmup": str(s.warmup), "repeat": str(s.repeat),
                "use_gpu": str(s.use_gpu), "threads": str(s.threads), "torch_model": str(s.torch_model or ""),
                **{f"env.{k}": str(v) for k, v in self.environment.items()}}

    def write(self, directory: str | Path) -> dict[str, Path]:
        """benchmark.md, benchmark.csv, benchmark.json and latency.png (when matplotlib is there)."""
        directory = Path(directory)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            files = {"markdown": directory / FILES["markdown"], "csv": directory / FILES["csv"],
                     "json": directory / FILES["json"]}
            files["markdown"].write_text(self.markdown(), encoding="utf-8")
            with files["csv"].open("w", newline="", encoding="utf-8") as handle:
                writer = csv.DictWriter(handle, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(dataclasses.asdict(c) for c in self.cells)
            files["json"].write_text(json.dumps(self.as_dict(), indent=2) + "\n", encoding="utf-8")
            plot = self.plot(directory / FILES["plot"])
        except OSError as err:
            from mlstep.errors import OutputError

            raise OutputError(f"{directory}: cannot write the benchmark files ({err.strerror or err})") from err
        if plot is not None:
            files["plot"] = plot
        self.files = files
        return files

    def plot(self, path: Path) -> Path | None:
        """Latency vs sequence (or past) length, one line per engine/precision, one panel per batch size."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return None
        batches = list(dict.fromkeys(c.batch_size for c in self.cells))
        fig = Figure(figsize=(4.2 * len(batches), 3.6), dpi=110)
        axes = fig.subplots(1, len(batches), squeeze=False)[0]
        for ax, batch in zip(axes, batches):
            for engine, precision, b in self.rows():
                if b != batch:
                    continue
                cells = [c for c in self.cells if (c.engine, c.precision, c.batch_size) == (engine, precision, b)]
                xs = [c.past_sequence_length if self.has_past else c.sequence_length for c in cells]
                ax.plot(xs, [c.median_ms for c in cells], marker="o", label=f"{engine} {precision}",
                        ls="--" if precision == "fp16" else "-")
            ax.set_title(f"batch {batch}", fontsize=9)
            ax.set_xlabel("past length (1 new token)" if self.has_past else "sequence length")
            ax.set_ylabel("median ms")
            ax.grid(alpha=0.3)
        axes[0].legend(fontsize=7)
        fig.suptitle(f"mlstep benchmark ({self.environment.get('provider', '?')})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path)
        return path


def run_grid(source_path: str | Path, settings: GridSettings = GridSettings(), options: Any = None,
             progress: Progress | None = None) -> GridResult:
    """Optimize ``source_path`` in process, then time every engine over the grid (see the module docstring)."""
    import onnxruntime as ort

    from mlstep.bench.gates import has_past, shaped_feeds
    from mlstep.bench.latency import intra_op_threads
    from mlstep.optimizer import OptimizeOptions, io as model_io
    from mlstep.runtime import CUDA, providers as loadable_providers

    settings = settings.checked()
    options = options or OptimizeOptions(use_gpu=settings.use_gpu)
    source_path = Path(source_path)
    model = model_io.load(source_path)
    past = has_past(model)
    columns = (settings.past_sequence_lengths or settings.sequence_lengths) if past else settings.sequence_lengths
    providers = loadable_providers(settings.use_gpu)
    torch_model = None
    if settings.torch_model:
        if past:
            raise UsageError("--torch: models with past inputs are not timed in torch yet (no cache mapping)")
        torch_model = load_torch_model(settings.torch_model, cuda=providers[0] == CUDA,
                                       seed=settings.seed)

    shapes = [(b, col) for b in settings.batch_sizes for col in columns]
    feeds = {}
    for batch, col in shapes:
        feeds[(batch, col)] = shaped_feeds(model, batch, 1 if past else col, col if past else 0, settings.seed)

    with tempfile.TemporaryDirectory(prefix="mlstep-benchmark-") as work:
        engines = [(ORT_SOURCE, "fp32", source_path)]
        if progress:
            progress(0, 0, "optimizing")
        engines += [(ORT_MLSTEP, name, path) for name, path in _variants(source_path, options, settings, work).items()]
        torch_engines = []
        if torch_model is not None:
            torch_engines = [(TORCH_EAGER, "fp32")]
            if providers[0] == CUDA:
                torch_engines.append((TORCH_EAGER, "fp16"))
        total = (len(engines) + len(torch_engines)) * len(shapes)
        cells, done, env = [], 0, {}
        for engine, precision, path in engines:
            cells_for, info = _time_ort(path, providers, settings, shapes, feeds, past, engine, precision,
                                        lambda what: progress and progress(done, total, what))
            for cell in cells_for:
                cells.append(cell)
                done += 1
                if progress:
                    progress(done, total, f"{engine} {precision}")
            env.update(info)
        for engine, precision in torch_engines:
            for (batch, col) in shapes:
                if progress:
                    progress(done, total, f"{engine} {precision} batch {batch} {'past' if past else 's'}={col}")
                cells.append(_time_torch(torch_model, precision, feeds[(batch, col)], settings, engine))
                done += 1
        if progress:
            progress(total, total, "done")
    env.update(onnxruntime=ort.__version__, ort_threads=intra_op_threads(settings.threads),
               cpu=_cpu_name(), platform=platform.platform())
    if torch_model is not None:
        import torch

        env.update(torch=torch.__version__, torch_threads=torch.get_num_threads())
    return GridResult(str(source_path), past, cells, settings, env)


def mlflow_logger() -> Callable[..., Any]:
    """``mlstep.registry.log_benchmark``, or ``UsageError`` when this version has none (checked before timing)."""
    try:
        from mlstep import registry
    except ImportError as err:
        raise UsageError("MLflow logging needs mlstep.registry, which is not available in this version") from err
    log = getattr(registry, "log_benchmark", None)
    if log is None:
        raise UsageError("MLflow logging needs mlstep.registry.log_benchmark, which is not available in this version")
    return log


def log_to_mlflow(result: GridResult, source: str) -> Any:
    """Log the grid to MLflow through ``mlstep.registry.log_benchmark`` (the only module importing mlflow).

    The call: ``log_benchmark(source=..., params={str: str}, metrics={str: float}, artifacts=[Path, ...],
    tags={str: str})``; it returns whatever the registry returns (the run id).
    """
    return mlflow_logger()(source=source, params=result.params(), metrics=result.metrics(),
                           artifacts=[p for p in result.files.values() if p is not None],
                           tags={"mlstep.kind": "benchmark"})


# ------------------------------------------------------------------------------------------- internals

def _variants(source_path: Path, options, settings: GridSettings, work: str) -> dict[str, Path]:
    from mlstep.optimizer import optimize_file
    from mlstep.variants import build_variants

    optimized = optimize_file(source_path, options)
    paths, _ = build_variants(optimized.model, settings.precisions, Path(work))
    return paths


def _time_ort(path, providers, settings, shapes, feeds, past, engine, precision, note):
    from mlstep.bench.latency import (adapt_feeds, intra_op_threads, make_runner, open_session, summarize,
                                      time_calls, uses_io_binding)

    session = open_session(path, providers, settings.threads)
    provider, binding = session.get_providers()[0], uses_io_binding(session)
    threads = intra_op_threads(settings.threads)
    cells = []
    for batch, col in shapes:
        feed, shape = feeds[(batch, col)]
        note(f"{engine} {precision} batch {batch} {'past' if past else 's'}={col}")
        try:
            run = make_runner(session, adapt_feeds(session, feed))
            stats = summarize(time_calls(run, settings.warmup, settings.repeat), provider)
        except BadInputError:
            raise
        except Exception as err:
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise BadInputError(f"{engine} {precision}, batch {batch} x {'past' if past else 'sequence'} {col}: "
                                f"the run failed ({first[:300]})") from err
        cells.append(Cell(engine, precision, batch, shape["sequence_length"], shape["past_sequence_length"],
                          stats.median_ms, stats.p90_ms, stats.p95_ms, stats.mean_ms, provider, threads, binding))
    return cells, {"provider": provider, "io_binding": binding}


def load_torch_model(spec: str, cuda: bool = False, seed: int = 0):
    """A transformers model from a folder (pretrained weights if present, else random) or a config JSON file."""
    import torch
    import transformers as tf

    path = Path(spec).expanduser()
    torch.manual_seed(seed)
    try:
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise BadInputError(f"--torch {spec}: a folder without config.json")
            weights = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin")]
            if weights:
                model = tf.AutoModel.from_pretrained(str(path), local_files_only=True)
            else:
                model = tf.AutoModel.from_config(tf.AutoConfig.from_pretrained(str(path), local_files_only=True))
        elif path.is_file():
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, dict) or "model_type" not in data:
                raise BadInputError(f"--torch {spec}: not a transformers config (no model_type)")
            model = tf.AutoModel.from_config(tf.AutoConfig.for_model(**data))
        else:
            raise BadInputError(f"--torch {spec}: no such file or directory")
    except BadInputError:
        raise
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(f"--torch {spec}: cannot build the model ({first[:300]})") from err
    model.eval()
    return model.to("cuda") if cuda else model


def _time_torch(model, precision: str, feeds_and_shape, settings: GridSettings, engine: str) -> Cell:
    import torch

    from mlstep.bench.latency import summarize, time_calls

    feed, shape = feeds_and_shape
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = next(model.parameters()).device
    if precision == "fp16":
        model = model.half()
    accepted = set(inspect.signature(model.forward).parameters)
    inputs = {k: torch.from_numpy(v).to(device) for k, v in feed.items() if k in accepted}
    if not inputs:
        raise BadInputError(f"--torch: none of the ONNX inputs ({', '.join(feed)}) is a forward() argument")
    cuda = device.type == "cuda"

    def run():
        with torch.inference_mode():
            model(**inputs)
        if cuda:
            torch.cuda.synchronize()

    try:
        stats = summarize(time_calls(run, settings.warmup, settings.repeat), "cuda" if cuda else "cpu")
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BadInputError(f"{engine}, batch {shape['batch_size']} x sequence {shape['sequence_length']}: "
                            f"the run failed ({first[:300]})") from err
    finally:
        if precision == "fp16":
            model.float()
    return Cell(engine, precision, shape["batch_size"], shape["sequence_length"], shape["past_sequence_length"],
                stats.median_ms, stats.p90_ms, stats.p95_ms, stats.mean_ms, stats.provider,
                torch.get_num_threads(), False)


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


__all__ = ["Cell", "GridResult", "GridSettings", "load_torch_model", "log_to_mlflow", "mlflow_logger", "run_grid"]
