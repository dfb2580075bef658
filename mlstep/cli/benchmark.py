"""``mlstep benchmark``: wires flags to ``GridSettings`` and calls ``mlstep.bench.grid.run_grid``.

The table goes to stdout (rich); progress to stderr (a live bar on a terminal, nothing otherwise);
``--output DIR`` writes benchmark.md, benchmark.csv, benchmark.json and latency.png.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlstep.errors import UsageError

SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", show_default=False,
    help="A .onnx file, an MLflow model directory or an MLflow URI (runs:/..., models:/...).")]
BatchOpt = Annotated[Optional[list[str]], typer.Option(
    "--batch-size", "-b", show_default=False, metavar="N[,N...]",
    help="Batch sizes (repeat or comma list). Default: 1.")]
SequenceOpt = Annotated[Optional[list[str]], typer.Option(
    "--sequence-length", "-s", show_default=False, metavar="N[,N...]",
    help="Sequence lengths, the table's columns (repeat or comma list). Default: 8,16,32.")]
PastOpt = Annotated[Optional[list[str]], typer.Option(
    "--past-sequence-length", show_default=False, metavar="N[,N...]",
    help="For a model with past inputs (GPT-2 with past): past lengths, the columns, each timed with one new "
         "token. Default: the --sequence-length values.")]
PrecisionOpt = Annotated[Optional[list[str]], typer.Option(
    "--precision", "-p", show_default=False, metavar="fp32,fp16",
    help="mlstep variants to time (repeat or comma list). Default: fp32,fp16.")]
TorchOpt = Annotated[Optional[str], typer.Option(
    "--torch", metavar="MODEL", show_default=False,
    help="Also time PyTorch eager: a transformers folder (its weights, or random ones when it has none) or "
         "a config JSON file (random weights).")]
WarmupOpt = Annotated[int, typer.Option("--warmup", min=0, metavar="N", help="Untimed calls per cell.")]
RepeatOpt = Annotated[int, typer.Option("--repeat", min=1, metavar="N", help="Timed calls per cell.")]
ThreadsOpt = Annotated[int, typer.Option(
    "--threads", min=0, metavar="N", help="Intra-op threads for ONNX Runtime and torch; 0 keeps their defaults.")]
UseGpuOpt = Annotated[bool, typer.Option("--use-gpu", help="Time on CUDA when it loads (IO binding).")]
OutputOpt = Annotated[Optional[Path], typer.Option(
    "--output", "-o", metavar="DIR", show_default=False,
    help="Write benchmark.md, benchmark.csv, benchmark.json and latency.png into DIR.")]
LogOpt = Annotated[bool, typer.Option(
    "--log-to-mlflow",
    help="Log the figures and files as a run in MLflow (MLFLOW_TRACKING_URI; always done for an MLflow source).")]


def benchmark(
    source: SourceArg,
    batch_size: BatchOpt = None,
    sequence_length: SequenceOpt = None,
    past_sequence_length: PastOpt = None,
    precision: PrecisionOpt = None,
    torch: TorchOpt = None,
    warmup: WarmupOpt = 5,
    repeat: RepeatOpt = 30,
    threads: ThreadsOpt = 0,
    use_gpu: UseGpuOpt = False,
    output: OutputOpt = None,
    log_to_mlflow: LogOpt = False,
) -> None:
    """Latency of SOURCE over batch sizes x sequence lengths: ONNX Runtime on the source and on its mlstep fp32/fp16 variants, optionally PyTorch; a table with one row per engine, precision and batch size and one column per sequence length.

    For an MLflow source (or with --log-to-mlflow) the figures and files are logged as an MLflow run.

    Exit code 0 on success, 2 for bad input or usage, or an MLflow store that refused or did not answer.
    """  # noqa: E501 (typer keeps line breaks: one paragraph per line)
    from mlstep.bench.grid import GridSettings, log_to_mlflow as log_grid, mlflow_logger, run_grid
    from mlstep.step import MLFLOW_SCHEMES

    settings = GridSettings(
        batch_sizes=_ints(batch_size, "--batch-size") or (1,),
        sequence_lengths=_ints(sequence_length, "--sequence-length") or GridSettings.sequence_lengths,
        past_sequence_lengths=_ints(past_sequence_length, "--past-sequence-length"),
        precisions=_words(precision) or ("fp32", "fp16"), warmup=warmup, repeat=repeat, use_gpu=use_gpu,
        threads=threads, torch_model=torch).checked()
    log = log_to_mlflow or source.startswith(MLFLOW_SCHEMES)
    if log:
        mlflow_logger()                     # fail before timing anything when logging is unavailable
    with _resolved(source, identify=log) as resolved:
        with _progress() as progress:
            result = run_grid(resolved.local_path, settings, progress=progress)
    if output is not None:
        result.write(output)
    _print_table(result)
    if log:
        logged = log_grid(result, resolved)
        print(f"mlflow: {logged}", flush=True)


@contextlib.contextmanager
def _resolved(source: str, identify: bool):
    """The source resolved by mlstep.registry (MLflow URIs downloaded; a local file hashed when logged, and the
    store asked first: a dead one fails before the timing, not after)."""
    from mlstep.registry import Store, is_mlflow_uri, materialize

    if identify and not is_mlflow_uri(source):
        Store().ping()
    with materialize(source, identify_local=identify) as resolved:
        yield resolved


def _ints(values: list[str] | None, flag: str) -> tuple[int, ...]:
    out = []
    for word in _words(values):
        try:
            out.append(int(word))
        except ValueError:
            raise UsageError(f"{flag}: {word!r} is not an integer") from None
    return tuple(out)


def _words(values: list[str] | None) -> tuple[str, ...]:
    from mlstep.cli import comma_list

    return comma_list(values)


class _progress:
    """A transient progress bar on stderr when it is a terminal; otherwise silent."""

    def __enter__(self):
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        self.bar = None
        if not console.is_terminal:
            return None
        self.bar = Progress(TextColumn("[bold]benchmark[/]"), BarColumn(), MofNCompleteColumn(),
                            TimeElapsedColumn(), TextColumn("{task.description}"), console=console,
                            transient=True)
        self.bar.start()
        self.task = self.bar.add_task("", total=None)
        return self.update

    def update(self, done: int, total: int, what: str) -> None:
        from rich.markup import escape

        self.bar.update(self.task, completed=done, total=total or None, description=escape(what))

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()


def _print_table(result) -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    header, rows = result.table()
    table = Table(title=f"mlstep benchmark: {result.source}", caption=result.caption(), box=box.SIMPLE_HEAD)
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i < 2 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    Console(highlight=False).print(table)
    for kind, path in result.files.items():
        Console(highlight=False).print(f"{kind}: {path}", markup=False)
