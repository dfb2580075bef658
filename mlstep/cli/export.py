"""``mlstep export``: wires flags to ``mlstep.export.export_model`` and prints what was written."""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer


class Exporter(str, Enum):
    dynamo = "dynamo"
    torchscript = "torchscript"


class AttentionImpl(str, Enum):
    sdpa = "sdpa"
    eager = "eager"


ModelArg = Annotated[str, typer.Argument(
    metavar="MODEL", show_default=False,
    help="A local transformers model folder (config.json + weights) or a config JSON (random weights, seed 0). "
         "Families: bert, distilbert, roberta, albert, gpt2 (DistilGPT2 is a 6-layer gpt2). The head that "
         "config.json's architectures names is kept: base model, sequence or token classification, question "
         "answering, masked LM; gpt2: GPT2LMHeadModel or GPT2Model. Other architectures are refused.")]
OutputOpt = Annotated[Path, typer.Option(
    "--output", "-o", metavar="FILE", show_default=False,
    help="The .onnx file to write (weights beside it as FILE.data when large or with --external-data).")]
ExporterOpt = Annotated[Exporter, typer.Option(
    "--exporter", case_sensitive=False, help="torch.onnx exporter: dynamo (torch.export) or torchscript.")]
OpsetOpt = Annotated[Optional[int], typer.Option(
    "--opset", show_default=False, help="ONNX opset. Default: 18 for dynamo (18+), 17 for torchscript (14..20).")]
AttentionOpt = Annotated[AttentionImpl, typer.Option(
    "--attention", case_sensitive=False, help="transformers attention implementation traced into the graph.")]
WithPastOpt = Annotated[bool, typer.Option(
    "--with-past", help="gpt2: past_key_{i}/past_value_{i} inputs and present_key_{i}/present_value_{i} outputs; "
                        "attention_mask then spans past + current tokens.")]
NoLmHeadOpt = Annotated[bool, typer.Option(
    "--no-lm-head", help="gpt2: export GPT2Model (output last_hidden_state) instead of GPT2LMHeadModel (logits).")]
ExternalDataOpt = Annotated[Optional[bool], typer.Option(
    "--external-data/--no-external-data", show_default=False,
    help="Write the weights beside the model. Default: only when they exceed 1 GiB.")]


def export(
    model: ModelArg,
    output: OutputOpt,
    exporter: ExporterOpt = Exporter.dynamo,
    opset: OpsetOpt = None,
    attention: AttentionOpt = AttentionImpl.sdpa,
    with_past: WithPastOpt = False,
    no_lm_head: NoLmHeadOpt = False,
    external_data: ExternalDataOpt = None,
) -> None:
    """Export a transformers model (local folder or config JSON) to ONNX, with readable dynamic dims (batch, sequence, past_sequence, total_sequence).

    Exit code 0 when written, 2 for bad input or usage (a missing folder, an unreadable config, an unsupported architecture or task head).
    """  # noqa: E501 (typer keeps line breaks: one paragraph per line)
    import logging

    from mlstep.export import DEFAULT_OPSET, export_model

    logging.disable(logging.WARNING)   # torch.onnx's registration chatter, transformers' config notes
    result = export_model(model, output, exporter.value, opset, attention.value, with_past, not no_lm_head,
                          external_data)

    def io(values):
        return ", ".join(f"{name}[{', '.join(str(d) for d in dims)}]" for name, dims in values)

    weights = "random weights" if result.random_weights else "weights from the folder"
    typer.echo(f"exported {result.architecture} ({weights}, {exporter.value}, opset "
               f"{opset or DEFAULT_OPSET[exporter.value]}) -> {result.path}"
               + (" (+ external data)" if result.external_data else ""))
    typer.echo(f"  inputs:  {io(result.inputs)}")
    typer.echo(f"  outputs: {io(result.outputs)}")
