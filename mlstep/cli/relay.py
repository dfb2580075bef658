"""``mlstep relay``: wires flags to :mod:`mlstep.relay` (MLflow webhooks -> GitHub repository_dispatch)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer

from mlstep.relay import ALIAS_CREATED, RELAYABLE, RelaySettings

_D = RelaySettings.__dataclass_fields__

RepositoryOpt = Annotated[str, typer.Option(
    "--repository", "-r", metavar="OWNER/NAME", show_default=False,
    help="The GitHub repository that receives repository_dispatch (its workflow listens with `types:`).")]
ApiUrlOpt = Annotated[Optional[str], typer.Option(
    "--api-url", metavar="URL", show_default=False,
    help="GitHub's REST API. Default: $GITHUB_API_URL, else https://api.github.com (GHES: https://HOST/api/v3).")]
EventTypeOpt = Annotated[str, typer.Option(
    "--event-type", metavar="TYPE", help="repository_dispatch event_type sent to GitHub.")]
EventOpt = Annotated[Optional[list[str]], typer.Option(
    "--event", "-e", metavar="EVENT", show_default=False,
    help=f"MLflow events relayed (repeat or comma list): {', '.join(RELAYABLE)}. Default: {ALIAS_CREATED}.")]
AliasOpt = Annotated[Optional[list[str]], typer.Option(
    "--alias", "-a", metavar="ALIAS", show_default=False,
    help="Aliases whose setting is relayed (repeat or comma list). Default: candidate.")]
ModelFilterOpt = Annotated[Optional[str], typer.Option(
    "--model-filter", metavar="GLOB", show_default=False,
    help="Relay only registered models whose name matches this glob (e.g. 'bert-*'). Default: every model.")]
WindowOpt = Annotated[int, typer.Option(
    "--window", metavar="SECONDS", help="Deliveries older (or newer) than this are refused as replays.")]
HostOpt = Annotated[str, typer.Option("--host", help="Address to listen on.")]
PortOpt = Annotated[int, typer.Option("--port", "-p", help="Port to listen on (0: a free port, printed).")]


def relay(
    repository: RepositoryOpt,
    api_url: ApiUrlOpt = None,
    event_type: EventTypeOpt = _D["event_type"].default,
    event: EventOpt = None,
    alias: AliasOpt = None,
    model_filter: ModelFilterOpt = None,
    window: WindowOpt = _D["window_s"].default,
    host: HostOpt = _D["host"].default,
    port: PortOpt = _D["port"].default,
) -> None:
    """Relay MLflow webhooks to GitHub: verify each delivery's signature, refuse replays and unknown events, and send repository_dispatch (client_payload: model, version, alias) for an alias set on a model version.

    The webhook secret is read from MLSTEP_WEBHOOK_SECRET, the GitHub token from MLSTEP_GITHUB_TOKEN or GITHUB_TOKEN. Listens on POST /webhook (GET /health); one line per delivery on stderr. Exit code 2 when a setting is missing or wrong.
    """  # noqa: E501
    from mlstep.relay import serve, settings_from

    serve(settings_from(repository, api_url=api_url, event_type=event_type, events=event, aliases=alias,
                        model_filter=model_filter, window_s=window, host=host, port=port))
