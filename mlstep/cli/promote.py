"""``mlstep promote``: point an alias at a registered version, only if mlstep's gates passed for it."""
from __future__ import annotations

from typing import Annotated

import typer

VersionArg = Annotated[str, typer.Argument(
    metavar="MODEL_URI", show_default=False,
    help="models:/NAME/VERSION (or models:/NAME@ALIAS) of a version registered by mlstep optimize.")]
AliasOpt = Annotated[str, typer.Option(
    "--alias", "-a", metavar="ALIAS", show_default=False, help="The alias to move, e.g. champion.")]


def promote(uri: VersionArg, alias: AliasOpt) -> None:
    """Move ALIAS to MODEL_URI when the version's mlstep.gates tag is 'passed'.

    Exit code 0 when the alias was moved, 1 when the version did not pass mlstep's gates (or was not made by mlstep), 2 for an unknown model, version or alias, or an MLflow store that did not answer.
    """  # noqa: E501
    from mlstep import registry

    name, version, previous = registry.promote(uri, alias)
    was = "" if previous is None else (" (unchanged)" if previous == version else f" (was version {previous})")
    typer.echo(f"models:/{name}@{alias} -> models:/{name}/{version}{was}")
