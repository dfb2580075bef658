"""``mlstep optimize``: wires flags to ``OptimizeOptions`` + ``StepSettings`` and calls ``mlstep.step.run``.

Progress goes to stderr: a live display when stderr is a terminal; when it is not, one line per started and
per finished stage under CI (``CI`` set; ``::group::``/``::endgroup::`` under ``GITHUB_ACTIONS=true``) or
with ``--verbose``, and nothing otherwise, so a failed run in a script prints exactly one line (the error).
The summary (per-variant fusions, parity, latency, a GPU fallback) goes to stdout; ``--verbose``'s fusion
log goes to stderr.
"""
from __future__ import annotations

import os
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from mlstep.cli import comma_list
from mlstep.optimizer.options import FUSIONS, MODEL_TYPES

ModelType = Enum("ModelType", {name: name for name in MODEL_TYPES}, type=str)
Fusion = Enum("Fusion", {name: name for name in FUSIONS}, type=str)


OPT = "Optimizer options"
STEP = "Step options"
REG = "MLflow registration"

SourceArg = Annotated[str, typer.Argument(
    metavar="SOURCE", show_default=False,
    help="A .onnx file, an MLflow model directory (a folder with an MLmodel file), or an MLflow URI: "
         "runs:/RUN_ID/PATH, models:/NAME/VERSION, models:/NAME@ALIAS, models:/m-ID (tracking server from "
         "MLFLOW_TRACKING_URI; default sqlite:///./mlflow.db).")]
OutputOpt = Annotated[Path, typer.Option(
    "--output", "-o", metavar="DIR", show_default=False,
    help="Output folder: DIR/fp32/model.onnx, DIR/fp16/model.onnx, DIR/report.json, DIR/report.md. Written "
         "to a temporary folder beside it and moved into place at the end; an earlier mlstep output there is "
         "replaced, any other non-empty folder is refused.")]
PrecisionOpt = Annotated[Optional[list[str]], typer.Option(
    "--precision", "-p", metavar="fp32,fp16", show_default=False, rich_help_panel=STEP,
    help="Variants to produce: fp32, fp16 or both (a comma list, or repeat the flag). Default: both.")]
SkipValidationOpt = Annotated[bool, typer.Option(
    "--skip-validation", rich_help_panel=STEP,
    help="Do not check parity against the source (the parity gate is then 'skipped').")]
SkipBenchmarkOpt = Annotated[bool, typer.Option(
    "--skip-benchmark", rich_help_panel=STEP, help="Do not measure latency.")]
BatchOpt = Annotated[int, typer.Option(
    "--batch-size", min=1, metavar="N", rich_help_panel=STEP,
    help="Batch of the synthesized inputs used for parity and latency (>= 2 for parity).")]
SequenceOpt = Annotated[int, typer.Option(
    "--sequence-length", min=1, metavar="N", rich_help_panel=STEP,
    help="Tokens per row of the synthesized inputs used for parity and latency (>= 1).")]
GATE = "Latency gate options"
MaxSlowdownOpt = Annotated[float, typer.Option(
    "--max-slowdown", min=0.0, metavar="FRACTION", rich_help_panel=GATE,
    help="A variant fails the latency gate when it is slower than the source by more than this fraction "
         "(0.05: 5%).")]
MinSpeedupOpt = Annotated[Optional[float], typer.Option(
    "--min-speedup", min=0.0, metavar="X", show_default=False, rich_help_panel=GATE,
    help="Also fail a variant that is not at least X times faster than the source (e.g. 1.2).")]
GateFp16CpuOpt = Annotated[bool, typer.Option(
    "--gate-fp16-on-cpu", rich_help_panel=GATE,
    help="Also gate the fp16 variant's latency when it runs on the CPU (by default it is timed and reported "
         "there but not gated: ONNX Runtime has few fp16 CPU kernels; fp16 is the GPU variant).")]
AllowPartialOpt = Annotated[bool, typer.Option(
    "--allow-partial-fusion", rich_help_panel=STEP,
    help="Pass the coverage gate although a detected transformer block stayed unfused (it is still "
         "reported, with the reason, and warned about). A graph with no transformer block fails regardless.")]
RequireGpuOpt = Annotated[bool, typer.Option(
    "--require-gpu", rich_help_panel=GATE,
    help="Stop with exit code 2 unless ONNX Runtime can use the GPU (CUDA); the message says what is missing. "
         "Without it, --use-gpu falls back to the CPU and the report says so.")]
WarmupOpt = Annotated[int, typer.Option(
    "--warmup", min=0, metavar="N", rich_help_panel=GATE, help="Untimed rounds per model before timing.")]
RepeatOpt = Annotated[int, typer.Option(
    "--repeat", min=1, metavar="N", rich_help_panel=GATE,
    help="Timed rounds per model (each round averages several calls; the source and the variants take turns).")]
ModelTypeOpt = Annotated[ModelType, typer.Option(
    "--model-type", case_sensitive=False, rich_help_panel=OPT,
    help="Model family (bert covers BERT, DistilBERT, RoBERTa and ALBERT; gpt2 covers GPT-2 and DistilGPT2); "
         "auto detects it from the graph.")]
NumHeadsOpt = Annotated[int, typer.Option(
    "--num-heads", metavar="N", rich_help_panel=OPT,
    help="Attention heads; 0 detects from the graph. Where the graph shows another count, the graph's is used "
    "(the report says so).")]
HiddenSizeOpt = Annotated[int, typer.Option(
    "--hidden-size", metavar="N", rich_help_panel=OPT,
    help="Hidden size; 0 detects from the graph (whose size wins, said in the report). Must be divisible by "
    "--num-heads.")]
InputInt32Opt = Annotated[bool, typer.Option(
    "--input-int32", rich_help_panel=OPT,
    help="Take token ids and masks as int32 instead of int64 (what ONNX Runtime's fused operators use).")]
UseGpuOpt = Annotated[bool, typer.Option(
    "--use-gpu", rich_help_panel=OPT,
    help="Check parity and measure latency on the GPU (CUDA) and fuse for the GPU. When ONNX Runtime cannot "
         "use the GPU the step runs on the CPU, and the report and summary say why.")]
OptLevelOpt = Annotated[int, typer.Option(
    "--opt-level", metavar="0|1|2|99", rich_help_panel=OPT,
    help="Let ONNX Runtime's own graph optimizer run first at this level (0: not at all); mlstep fuses its "
         "output.")]
VerboseOpt = Annotated[bool, typer.Option(
    "--verbose", "-v", rich_help_panel=OPT,
    help="On stderr: per fusion, what fused and what was refused and why (also in report.md), and one line "
         "per stage when stderr is not a terminal.")]
RegisterAsOpt = Annotated[Optional[str], typer.Option(
    "--register-as", metavar="NAME", show_default=False, rich_help_panel=REG,
    help="Register the gate-passed variants as new versions of the registered model NAME (default for an "
         "MLflow source: the source's registered model; a local source registers only with this flag).")]
NoRegisterOpt = Annotated[bool, typer.Option(
    "--no-register", rich_help_panel=REG,
    help="Dry run: write nothing to MLflow (no run, no versions); an MLflow source is still read.")]
AliasFp32Opt = Annotated[str, typer.Option(
    "--alias-fp32", metavar="ALIAS", rich_help_panel=REG,
    help="Alias given to the registered fp32 version ('' for none).")]
AliasFp16Opt = Annotated[str, typer.Option(
    "--alias-fp16", metavar="ALIAS", rich_help_panel=REG,
    help="Alias given to the registered fp16 version ('' for none).")]
ExperimentOpt = Annotated[Optional[str], typer.Option(
    "--experiment", metavar="NAME", show_default=False, rich_help_panel=REG,
    help="MLflow experiment of the step's run (default: MLFLOW_EXPERIMENT_NAME, else 'mlstep').")]
FormOpt = Annotated[str, typer.Option(
    "--form", metavar="auto|fused|attention-unfused|unfused", rich_help_panel=STEP,
    help="Which form of the optimized model the variants are: 'auto' times every form that passes parity at "
         "the gated shape on the target provider and keeps the fastest (mlstep.forms); a name forces it.")]
ExactPaddingOpt = Annotated[bool, typer.Option(
    "--exact-padding", rich_help_panel=OPT,
    help="Refuse an attention fusion whose fused op defines padded positions that see no key differently from "
         "the export (older GPT-2 exports under left padding); by default it fuses and parity leaves those "
         "positions out, saying so in the report.")]
DisableFusionOpt = Annotated[Optional[list[Fusion]], typer.Option(
    "--disable-fusion", case_sensitive=False, show_default=False, rich_help_panel=OPT,
    help="Turn one fusion off; repeat for several.")]


def optimize(
    source: SourceArg,
    output: OutputOpt,
    precision: PrecisionOpt = None,
    skip_validation: SkipValidationOpt = False,
    skip_benchmark: SkipBenchmarkOpt = False,
    batch_size: BatchOpt = 2,
    sequence_length: SequenceOpt = 8,
    max_slowdown: MaxSlowdownOpt = 0.05,
    min_speedup: MinSpeedupOpt = None,
    require_gpu: RequireGpuOpt = False,
    gate_fp16_on_cpu: GateFp16CpuOpt = False,
    allow_partial_fusion: AllowPartialOpt = False,
    form: FormOpt = "auto",
    warmup: WarmupOpt = 5,
    repeat: RepeatOpt = 30,
    model_type: ModelTypeOpt = ModelType.auto,
    num_heads: NumHeadsOpt = 0,
    hidden_size: HiddenSizeOpt = 0,
    input_int32: InputInt32Opt = False,
    use_gpu: UseGpuOpt = False,
    opt_level: OptLevelOpt = 0,
    verbose: VerboseOpt = False,
    exact_padding: ExactPaddingOpt = False,
    disable_fusion: DisableFusionOpt = None,
    register_as: RegisterAsOpt = None,
    no_register: NoRegisterOpt = False,
    alias_fp32: AliasFp32Opt = "optimized-fp32",
    alias_fp16: AliasFp16Opt = "optimized-fp16",
    experiment: ExperimentOpt = None,
) -> None:
    """Fuse SOURCE into ONNX Runtime's fused operators, write fp32/fp16 variants, check parity against the source, measure latency, and write report.json + report.md.

    For an MLflow source (or with --register-as) the step logs an MLflow run and registers each variant that passed every gate; a re-run with the same source and options registers nothing new.

    Gates: parity (every variant against the source), latency (noise-aware), coverage (every detected transformer block fused; a graph with none fails: nothing found to fuse).

    Exit code 0 when every gate passed, 1 when a gate failed (the outputs and the report are still written; nothing failing is registered), 2 for bad input, usage or an MLflow store that refused or did not answer, 3 for a bug in mlstep (a written variant ONNX Runtime cannot load), 130/143/129 on SIGINT/SIGTERM/SIGHUP (nothing left behind).
    """  # noqa: E501 (typer keeps line breaks: one paragraph per line)
    from mlstep import step
    from mlstep.optimizer.options import OptimizeOptions

    options = OptimizeOptions(
        model_type=model_type.value, num_heads=num_heads, hidden_size=hidden_size, input_int32=input_int32,
        use_gpu=use_gpu, opt_level=opt_level, verbose=verbose, exact_padding=exact_padding,
        disabled_fusions=frozenset(f.value for f in disable_fusion or ()))
    settings = step.StepSettings(
        precisions=comma_list(precision) or step.PRECISIONS,
        validate=not skip_validation, benchmark=not skip_benchmark,
        batch_size=batch_size, sequence_length=sequence_length, warmup=warmup, repeat=repeat,
        max_slowdown=max_slowdown, min_speedup=min_speedup, require_gpu=require_gpu,
        gate_fp16_on_cpu=gate_fp16_on_cpu, allow_partial_fusion=allow_partial_fusion,
        form=form)
    publish = step.PublishSettings(register=not no_register, register_as=register_as,
                                   aliases=(("fp32", alias_fp32), ("fp16", alias_fp16)), experiment=experiment)
    with _progress(verbose) as listener:
        result = step.run(source, output, options, settings, listener, publish)
    for line in result.warnings:
        print(f"mlstep: warning: unfused {line}", file=sys.stderr, flush=True)
    _print_summary(result, verbose)
    result.check()


# --------------------------------------------------------------------------------------------- display

class _RichProgress:
    """A spinner for the running stage and a line per finished stage, on stderr (a terminal)."""

    def __init__(self, console):
        self.console = console
        self.status = None

    def start(self, stage: str, detail: str = "") -> None:
        self.status = self.console.status(f"[bold]{stage}[/] {_escape(detail)}", spinner="dots")
        self.status.start()

    def done(self, stage: str, seconds: float, detail: str = "") -> None:
        self.stop()
        self.console.print(f"[green]✓[/] {stage:<9} {seconds:7.2f}s  {_escape(detail)}", highlight=False)

    def stop(self) -> None:
        if self.status is not None:
            self.status.stop()
            self.status = None


class _PlainProgress:
    """No terminal (CI logs, pipes): a line on stderr when a stage starts and one when it ends."""

    def start(self, stage: str, detail: str = "") -> None:
        _err(f"mlstep: {stage} ..." + (f" {detail}" if detail else ""))

    def done(self, stage: str, seconds: float, detail: str = "") -> None:
        _err(f"mlstep: {stage}: {detail + ' ' if detail else ''}({seconds:.2f}s)")


class _GitHubProgress(_PlainProgress):
    """Under GitHub Actions: each stage a collapsible group of the job's log (``::group::`` ... ``::endgroup::``)."""

    def start(self, stage: str, detail: str = "") -> None:
        _err(f"::group::mlstep {stage}" + (f" {_workflow_text(detail)}" if detail else ""))

    def done(self, stage: str, seconds: float, detail: str = "") -> None:
        _err(f"mlstep: {stage}: {_workflow_text(detail) + ' ' if detail else ''}({seconds:.2f}s)\n::endgroup::")


def listener_for(verbose: bool, terminal: bool, env=os.environ):
    """The progress display: live on a terminal; without one, stage lines under CI (``CI`` set; groups under
    ``GITHUB_ACTIONS=true``) or with ``--verbose``; otherwise none (a failed script run prints one line)."""
    if terminal:
        return None
    if env.get("GITHUB_ACTIONS", "").lower() == "true":
        return _GitHubProgress()
    if verbose or env.get("CI", "").lower() not in ("", "0", "false"):
        return _PlainProgress()
    return None


class _progress:
    def __init__(self, verbose: bool):
        from rich.console import Console

        console = Console(stderr=True)
        self.listener = _RichProgress(console) if console.is_terminal else listener_for(verbose, False)

    def __enter__(self):
        return self.listener

    def __exit__(self, *exc) -> None:
        if isinstance(self.listener, _RichProgress):
            self.listener.stop()


def _err(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _workflow_text(text: str) -> str:
    """A workflow command's text on one line (GitHub reads ``%``, CR and LF as escapes)."""
    return text.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")


def _print_summary(result, verbose: bool) -> None:
    """The summary on stdout; ``--verbose``'s fusion log on stderr (stdout stays the summary alone)."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from mlstep.report import fusion_table, runtime_line, summary_table

    # Not a terminal (CI logs, pipes): wide enough that the table's columns (URIs included) are not cut.
    wide = None if sys.stdout.isatty() or os.environ.get("COLUMNS") else 160
    console = Console(highlight=False, width=wide)
    report = result.report
    if verbose:
        for note in report.get("notes") or []:
            console.print(f"note: {note}", markup=False)
        for entry in result.fusion_log:
            _err(f"{entry.name}: fused {entry.fused}")
            for reason in entry.refused:
                _err(f"  refused: {reason}")
    if result.no_fusions:
        console.print("no fusions applied (run with --verbose for the reasons)" if not verbose
                      else "no fusions applied", markup=False)
    else:
        console.print(_table(Table(title="fused ops", box=box.SIMPLE_HEAD), *fusion_table(report)))
    console.print(_table(Table(title=f"mlstep optimize -> {result.output_dir}", box=box.SIMPLE_HEAD),
                         *summary_table(report)))
    if (report.get("runtime") or {}).get("gpu_fallback"):
        console.print(f"runtime: {runtime_line(report)}", markup=False, soft_wrap=True)
    record = report.get("mlflow")
    if record:
        source = record["source"]
        if source.get("uri") and source["uri"] != source.get("requested"):
            console.print(f"source: {source['requested']} -> {source['uri']}", markup=False, soft_wrap=True)
        if record.get("run_id"):
            status = f", {record['run_status']}" if record.get("run_status") else ""
            console.print(f"mlflow: run {record['run_id']} (experiment {record['experiment_id']}{status}) at "
                          f"{record['tracking_uri']}", markup=False, soft_wrap=True)
        for uri in record.get("removed_duplicates") or []:
            console.print(f"mlflow: removed duplicate version {uri}", markup=False, soft_wrap=True)


def _table(table, header, rows):
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    return table


def _escape(text: str) -> str:
    from rich.markup import escape

    return escape(text)
