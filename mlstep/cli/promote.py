"""``mlstep promote``: point an alias at a registered version, only on the evidence of its own mlstep run."""
from __future__ import annotations

from typing import Annotated

import typer

VersionArg = Annotated[str, typer.Argument(
    metavar="MODEL_URI", show_default=False,
    help="models:/NAME/VERSION (or models:/NAME@ALIAS) of a version registered by mlstep optimize.")]
AliasOpt = Annotated[str, typer.Option(
    "--alias", "-a", metavar="ALIAS", show_default=False, help="The alias to move, e.g. champion.")]


def promote(uri: VersionArg, alias: AliasOpt) -> None:
    """Move ALIAS to MODEL_URI when the version's own mlstep run proves it: its report's gate for the variant passed and its content hash matches the report.

    Exit code 0 when the alias was moved, 1 when the evidence is missing (not made by mlstep, a failed gate, content that differs from the report), 2 for an unknown model, version or alias, or an MLflow store that did not answer.
    """  # noqa: E501
    from mlstep import registry

    done = registry.promote(uri, alias)
    previous, version = done.previous, done.version
    was = "" if previous is None else (" (unchanged)" if previous == version else f" (was version {previous})")
    typer.echo(f"models:/{done.name}@{alias} -> models:/{done.name}/{version}{was}")
