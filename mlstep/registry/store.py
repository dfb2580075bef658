"""The MLflow store: where it is, how hard to try, and what its failures mean (one line, no secret).

Store: ``MLFLOW_TRACKING_URI`` (``MLFLOW_REGISTRY_URI`` for the registry when set; credentials through the
usual ``MLFLOW_TRACKING_USERNAME``/``PASSWORD``/``TOKEN`` variables or ``user:pass@`` in the URI). Unset,
the embedded default is MLflow 3's own: ``sqlite:///<cwd>/mlflow.db`` with artifacts in ``<cwd>/mlruns``.
A malformed URI (unknown scheme, no host, a port that is not a number) is refused before any request.

Retries: every HTTP request is retried by MLflow's client (connection errors, 429/5xx) with exponential
backoff; mlstep bounds it: ``MLSTEP_REGISTRY_RETRIES`` (default 5), ``MLSTEP_REGISTRY_BACKOFF`` (whole
seconds, default 1) and ``MLSTEP_REGISTRY_TIMEOUT`` (whole seconds per request, default 30). Set, they override
MLflow's ``MLFLOW_HTTP_REQUEST_*`` variables; unset, those are honoured. When they are spent: one line,
exit 2 (``RegistryError``). Retried POSTs are not idempotent (a lost reply to create-model-version makes a
second version): ``mlstep.registry.publish`` re-reads the store after each create and converges.
"""
from __future__ import annotations

import logging
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from mlstep.errors import BadInputError, MlstepError, RegistryError, UsageError
from mlstep.redact import scrub

DEFAULT_DB = "mlflow.db"
NO_TRACKING_URI = "MLFLOW_TRACKING_URI is not set (export it to name your tracking server, e.g. http://HOST:5000)"
ENV_RETRIES, ENV_BACKOFF, ENV_TIMEOUT = "MLSTEP_REGISTRY_RETRIES", "MLSTEP_REGISTRY_BACKOFF", "MLSTEP_REGISTRY_TIMEOUT"
RETRY_DEFAULTS = {ENV_RETRIES: ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5"),
                  ENV_BACKOFF: ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                  ENV_TIMEOUT: ("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")}
SCHEMES = ("http", "https", "sqlite", "file", "postgresql", "mysql", "mssql", "databricks", "databricks-uc", "uc")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` (checked), else the embedded default ``sqlite:///<cwd>/mlflow.db``."""
    uri = os.environ.get("MLFLOW_TRACKING_URI", "").strip()
    if uri:
        return check_uri(uri, "MLFLOW_TRACKING_URI")
    return f"sqlite:///{Path.cwd().absolute() / DEFAULT_DB}"


def check_uri(uri: str, variable: str) -> str:
    """A tracking/registry URI MLflow can use, else ``UsageError`` naming the variable (secrets scrubbed)."""
    shown = f"{variable}={shown_uri(uri)}"
    if any(c.isspace() or ord(c) < 32 for c in uri):
        raise UsageError(f"{shown}: malformed URI (blank or control characters)")
    if re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:?/{2}", uri) and "://" not in uri[:24]:
        raise UsageError(f"{shown}: malformed URI (a scheme without '://')")
    match = _SCHEME.match(uri)
    if not match or (len(match.group(1)) == 1 and os.name == "nt"):
        return uri                                    # a plain path: MLflow's file store
    scheme = match.group(1).lower().split("+", 1)[0]
    if scheme not in SCHEMES:
        raise UsageError(f"{shown}: unsupported scheme {scheme!r} (expected http(s)://HOST[:PORT], sqlite:///PATH, "
                         "a database URI, databricks or a folder)")
    try:
        parts = urlsplit(uri)
        port = parts.port                              # raises on a port that is not a number / out of range
        host = parts.hostname
    except ValueError as err:
        raise UsageError(f"{shown}: malformed URI ({scrub(str(err))})") from None
    if scheme in ("http", "https"):
        if not uri.lower().startswith(f"{scheme}://") or not host:
            raise UsageError(f"{shown}: malformed URI (expected {scheme}://HOST[:PORT][/PATH])")
        if port == 0:
            raise UsageError(f"{shown}: malformed URI (port 0)")
    return uri


def shown_uri(uri: str) -> str:
    """A URI fit for a message: no user info, no query string (tokens travel there sometimes)."""
    return scrub(uri.split("?", 1)[0])


_configured = False


def configure() -> None:
    """Retry policy and quiet output for the mlflow client, once per process (before mlflow is imported)."""
    global _configured
    if _configured:
        return
    for ours, (theirs, default) in RETRY_DEFAULTS.items():
        value = (os.environ.get(ours) or os.environ.get(theirs) or default).strip()
        if not value.isdigit():       # MLflow reads all three as integers
            raise UsageError(f"{ours if os.environ.get(ours) else theirs}={value!r}: expected a whole number >= 0")
        os.environ[theirs] = value
    # The client prints the run's URL (with any user:password in it) to stdout when a run ends, progress
    # bars when it downloads, and INFO lines when it registers: the step reports all that itself.
    os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    os.environ["MLFLOW_RECORD_ENV_VARS_IN_MODEL_LOGGING"] = "false"
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "ERROR")
    import mlflow  # noqa: F401  (configures its loggers on import)

    for name in ("mlflow", "alembic", "urllib3"):
        logging.getLogger(name).setLevel(logging.ERROR)
    _configured = True


def retry_policy() -> dict[str, int]:
    configure()
    return {"retries": int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]),
            "backoff_s": int(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]),
            "timeout_s": int(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])}


class Store:
    """An MLflow tracking + registry store: a client and the boundary that turns its failures into ours."""

    def __init__(self, uri: str | None = None, registry_uri: str | None = None, *, reading: str | None = None):
        """``reading``: the MLflow source the store is opened to read. With ``MLFLOW_TRACKING_URI`` unset and no
        ``./mlflow.db``, that source cannot be there: ``BadInputError`` with the hint, and no database is
        created just to find that out."""
        self.uri = check_uri(uri, "tracking URI") if uri else tracking_uri()
        self.default = not uri and not os.environ.get("MLFLOW_TRACKING_URI", "").strip()
        if reading is not None and self.default and not (Path.cwd() / DEFAULT_DB).exists():
            raise BadInputError(f"{scrub(reading)}: not found: {NO_TRACKING_URI} and there is no {DEFAULT_DB} "
                                f"in {Path.cwd()} (MLflow's default store)")
        # The environment names the registry only for the environment's store (mlflow.set_registry_uri
        # writes that variable too: a store given explicitly must not inherit an earlier one's registry).
        registry = registry_uri or ("" if uri else os.environ.get("MLFLOW_REGISTRY_URI", "").strip())
        self.registry_uri = check_uri(registry, "MLFLOW_REGISTRY_URI") if registry else self.uri
        configure()
        import mlflow
        from mlflow import MlflowClient

        self.shown = shown_uri(self.uri)
        mlflow.set_tracking_uri(self.uri)
        exported = os.environ.get("MLFLOW_REGISTRY_URI")
        mlflow.set_registry_uri(self.registry_uri)
        if exported is None and self.registry_uri == self.uri:
            # set_registry_uri exports the variable; a registry that is the tracking store needs no export, and
            # an exported one would outlive this store (a later store, a child process) and name a stale registry
            os.environ.pop("MLFLOW_REGISTRY_URI", None)
        self.client = MlflowClient(tracking_uri=self.uri, registry_uri=self.registry_uri)

    def call(self, what: str, fn: Callable, *args, **kwargs):
        """``fn(*args, **kwargs)`` with MLflow's failures turned into mlstep errors about ``what``."""
        try:
            return fn(*args, **kwargs)
        except MlstepError:
            raise
        except Exception as err:  # mlflow, requests, sqlalchemy: no common base
            raise self.translate(err, what) from err

    def translate(self, err: BaseException, what: str) -> MlstepError:
        code = getattr(err, "error_code", None)
        text = " ".join(scrub(str(err)).split())
        what = scrub(what)
        if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in text):
            hint = f" ({NO_TRACKING_URI}: the default store in this folder was searched)" if self.default else ""
            return BadInputError(f"{what}: not found in MLflow at {self.shown}{hint}")
        if unreachable(err, text):
            policy = retry_policy()
            retries = f"{policy['retries']} retr{'y' if policy['retries'] == 1 else 'ies'}"
            return RegistryError(f"MLflow at {self.shown} did not answer ({what}; {retries} with backoff "
                                 f"{policy['backoff_s']}s, {_reason(text)})")
        if code in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
            return BadInputError(f"{what}: {short(text)}")
        if code in ("PERMISSION_DENIED", "UNAUTHENTICATED") or (
                re.search(r"\b40[13]\b", text) and re.search(r"unauthori|forbidden|authenticat|permission", text, re.I)):
            return RegistryError(f"{what}: MLflow at {self.shown} refused the credentials ({short(text)})")
        return RegistryError(f"{what}: MLflow at {self.shown}: {type(err).__name__}: {short(text)}")

    def set_alias(self, name: str, alias: str, version: str) -> None:
        """Point ``name@alias`` at ``version``. MLflow's set-alias is an insert-or-update whose first insert
        races with another step's (the store refuses the second insert: a unique-constraint error); the row
        then exists and setting it again updates it. So a refusal is followed by a look: the alias already
        where we want it is done, else it is set once more; a second refusal is the error."""
        what = f"alias {alias}"
        for attempt in (1, 2):
            try:
                self.call(what, self.client.set_registered_model_alias, name, alias, version)
                return
            except BadInputError:
                try:
                    current = self.call(what, self.client.get_model_version_by_alias, name, alias)
                except BadInputError:                       # no such alias (yet): the refusal stands
                    current = None
                if current is not None and str(current.version) == str(version):
                    return
                if attempt == 2:
                    raise

    def ping(self) -> None:
        """Fail early (bounded retries, one line) when the store does not answer."""
        self.call("connect", self.client.search_experiments, max_results=1)


# ---------------------------------------------------------------------------------------------- helpers

def filter_string(name: str | None = None, tags: Mapping[str, str] | None = None, **attributes: str) -> str:
    """``name = '...' and tags.`k` = '...'`` for MLflow's search filters (quotes chosen to fit)."""
    parts = [f"name = {quote(name)}"] if name is not None else []
    parts += [f"{k} = {quote(v)}" for k, v in attributes.items()]
    parts += [f"tags.`{k}` = {quote(v)}" for k, v in (tags or {}).items()]
    return " and ".join(parts)


def quote(value: str) -> str:
    if "'" not in value:
        return f"'{value}'"
    if '"' not in value:
        return f'"{value}"'
    raise BadInputError(f"{scrub(value)!r}: names with both quote characters are not supported")


def unreachable(err: BaseException, text: str) -> bool:
    """A connection-level failure (the store did not answer), as opposed to an answer that refused."""
    import requests

    if isinstance(err, (requests.ConnectionError, requests.Timeout)):
        return True
    return any(s in text for s in ("Max retries exceeded", "Failed to establish a new connection",
                                   "Connection refused", "Read timed out", "ConnectTimeout",
                                   "too many 5", "RemoteDisconnected", "Connection broken",
                                   "Connection reset", "IncompleteRead", "Connection aborted"))


def is_unreachable(err: MlstepError) -> bool:
    return isinstance(err, RegistryError) and "did not answer" in str(err)


def _reason(text: str) -> str:
    for needle, reason in (("Connection refused", "connection refused"), ("timed out", "timed out"),
                           ("Name or service not known", "unknown host"), ("too many 5", "server errors"),
                           ("RemoteDisconnected", "connection closed"), ("Connection broken", "connection broken"),
                           ("Connection reset", "connection reset"), ("IncompleteRead", "connection broken"),
                           ("Connection aborted", "connection closed")):
        if needle in text:
            return reason
    return "no answer"


def short(text: str, limit: int = 200) -> str:
    text = re.sub(r"[A-Za-z][A-Za-z0-9+.-]*://\S+", lambda m: shown_uri(m.group(0)), scrub(text))
    return text if len(text) <= limit else text[: limit - 3] + "..."
