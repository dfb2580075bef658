"""``mlstep plan``: wires flags to :func:`mlstep.registry.plan.plan` and prints the matrix."""
from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

AliasOpt = Annotated[str, typer.Option(
    "--alias", "-a", metavar="ALIAS", help="Plan the versions this alias points at (one per registered model).")]
ModelFilterOpt = Annotated[Optional[str], typer.Option(
    "--model-filter", metavar="GLOB", show_default=False,
    help="Only registered models whose name matches this glob (e.g. 'bert-*'). Default: every model.")]
ModelOpt = Annotated[Optional[list[str]], typer.Option(
    "--model", "-m", metavar="NAME", show_default=False,
    help="Only this registered model, named exactly (repeatable), e.g. the model of a dispatched event.")]
MaxOpt = Annotated[int, typer.Option(
    "--max", metavar="N", help="At most N matrix entries (GitHub allows 256 jobs per matrix).")]


def plan(alias: AliasOpt = "candidate", model_filter: ModelFilterOpt = None, model: ModelOpt = None,
         max_entries: MaxOpt = 256) -> None:
    """Print a GitHub Actions matrix (JSON, one line on stdout) of the model versions ALIAS points at that have no passing mlstep variant yet: {"include": [{"model", "version", "alias", "model-uri"}]}.

    Why each version is in or out goes to stderr. Exit code 0 (also for an empty matrix), 2 for a bad alias, an unknown model, or an MLflow store that did not answer.
    """  # noqa: E501
    from mlstep.registry import Store
    from mlstep.registry.plan import plan as make_plan

    result = make_plan(Store(), alias, model_filter, tuple(model or ()), max_entries)
    for line in result.lines:
        typer.echo(f"mlstep plan: {line}", err=True)
    typer.echo(json.dumps(result.matrix(), separators=(",", ":")))
