"""``mlstep relay``: MLflow webhooks in, GitHub ``repository_dispatch`` out.

MLflow OSS 3 (SQL backends) POSTs a webhook for registry events, but cannot call GitHub's API itself (GitHub
wants its own request shape and a token). The relay sits between them:

    MLflow  --POST /webhook (HMAC-signed)-->  relay  --POST {api}/repos/{owner}/{repo}/dispatches-->  GitHub

What a delivery must carry (MLflow's scheme, ``mlflow.webhooks.delivery``, Standard Webhooks style):

- ``X-MLflow-Delivery-Id`` (a UUID), ``X-MLflow-Timestamp`` (Unix seconds) and ``X-MLflow-Signature``:
  ``v1,`` + base64(HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{body}")).
- a JSON body ``{"entity", "action", "timestamp", "data"}``; ``entity.action`` is the event
  (``model_version_alias.created``: data ``{name, alias, version}``; ``model_version.created``: data
  ``{name, version, source, run_id, tags, description}``).

What the relay answers (MLflow retries 429 and 5xx only, with the same delivery id):

    401  no signature, a wrong signature, a timestamp outside the window (replay of an old delivery)
    409  a delivery id already relayed (replay)
    400  a body that is not the JSON above, a delivery id that is not a UUID
    422  an event the relay does not relay (not in ``--event``)
    200  a relayed event the filters skip (another alias, a model outside ``--model-filter``): nothing sent
    200  dispatched: GitHub answered 204
    502  GitHub refused or did not answer: the delivery id is *not* remembered, so MLflow's retry is relayed

The signature is checked before the body is read as JSON, and the delivery id is remembered only once the
delivery is decided (dispatched or skipped), under a lock: two copies of one delivery never dispatch twice.
Ids older than the window are forgotten (the timestamp check refuses them anyway), so memory stays bounded.

One line per delivery on stderr (id, event, model, version, alias, verdict); never the secret or the token.
"""
from __future__ import annotations

import base64
import fnmatch
import hashlib
import hmac
import json
import re
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from mlstep.errors import UsageError

SIGNATURE_HEADER = "X-MLflow-Signature"
TIMESTAMP_HEADER = "X-MLflow-Timestamp"
DELIVERY_HEADER = "X-MLflow-Delivery-Id"
SIGNATURE_VERSION = "v1"
SECRET_ENV = "MLSTEP_WEBHOOK_SECRET"
TOKEN_ENVS = ("MLSTEP_GITHUB_TOKEN", "GITHUB_TOKEN")
GITHUB_API_VERSION = "2022-11-28"
ALIAS_CREATED = "model_version_alias.created"
VERSION_CREATED = "model_version.created"
RELAYABLE = (ALIAS_CREATED, VERSION_CREATED)
PATH = "/webhook"
MAX_BODY = 1 << 20
_REPOSITORY = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,38})/[A-Za-z0-9._-]{1,100}")


@dataclass(frozen=True)
class RelaySettings:
    """Where to listen, what to accept, where to send. ``secret`` and ``token`` come from the environment."""

    repository: str                                   # owner/name receiving repository_dispatch
    secret: str = field(repr=False)                   # the MLflow webhook's secret
    token: str = field(repr=False)                    # a GitHub token allowed to dispatch (contents: write)
    api_url: str = "https://api.github.com"           # GHES: https://HOST/api/v3
    event_type: str = "mlstep-optimize"               # repository_dispatch's event_type (workflow `types:`)
    events: tuple[str, ...] = (ALIAS_CREATED,)
    aliases: tuple[str, ...] = ("candidate",)         # alias events: relay only these aliases
    model_filter: str | None = None                   # fnmatch pattern on the registered model name
    window_s: int = 300                               # accepted clock skew / age of a delivery
    host: str = "127.0.0.1"
    port: int = 8765

    def __post_init__(self):
        if not _REPOSITORY.fullmatch(self.repository):
            raise UsageError(f"--repository {self.repository!r}: expected OWNER/NAME")
        if not self.secret:
            raise UsageError(f"{SECRET_ENV} is not set: the MLflow webhook's secret (the relay refuses "
                             f"unsigned deliveries)")
        if not self.token:
            raise UsageError(f"{' or '.join(TOKEN_ENVS)} is not set: a GitHub token that may dispatch to "
                             f"{self.repository}")
        if not re.match(r"https?://[^\s/]+", self.api_url):
            raise UsageError(f"--api-url {self.api_url!r}: expected http(s)://HOST[/PATH]")
        unknown = [e for e in self.events if e not in RELAYABLE]
        if unknown or not self.events:
            raise UsageError(f"--event {','.join(unknown) or '(none)'}: choose from {', '.join(RELAYABLE)}")
        if not 0 < len(self.event_type) <= 100:
            raise UsageError("--event-type: 1 to 100 characters (GitHub's limit)")
        if self.window_s <= 0:
            raise UsageError("--window must be positive")


@dataclass(frozen=True)
class Verdict:
    """What the relay did with one delivery: the HTTP status it answers and the word it logs."""

    status: int
    outcome: str            # dispatched | skipped | refused | failed
    reason: str
    event: str = "-"
    model: str = "-"
    version: str = "-"
    alias: str = "-"


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery: ``v1,`` + base64(HMAC-SHA256(secret, "id.timestamp.body"))."""
    content = delivery_id.encode() + b"." + timestamp.encode() + b"." + body
    digest = hmac.new(secret.encode(), content, hashlib.sha256).digest()
    return f"{SIGNATURE_VERSION},{base64.b64encode(digest).decode()}"


def dispatch_request(settings: RelaySettings, payload: dict) -> urllib.request.Request:
    """GitHub's documented ``repository_dispatch`` request (REST "Create a repository dispatch event")."""
    body = json.dumps({"event_type": settings.event_type, "client_payload": payload}).encode()
    url = f"{settings.api_url.rstrip('/')}/repos/{settings.repository}/dispatches"
    from mlstep import __version__

    return urllib.request.Request(url, data=body, method="POST", headers={
        "Accept": "application/vnd.github+json",
        "Authorization": f"Bearer {settings.token}",
        "X-GitHub-Api-Version": GITHUB_API_VERSION,
        "Content-Type": "application/json",
        "User-Agent": f"mlstep-relay/{__version__}",
    })


class Relay:
    """The decision for one delivery (:meth:`handle`), independent of the HTTP server around it."""

    def __init__(self, settings: RelaySettings, send: Callable[[urllib.request.Request], int] | None = None,
                 clock: Callable[[], float] = time.time):
        self.settings = settings
        self._send = send or _send
        self._clock = clock
        self._seen: OrderedDict[str, float] = OrderedDict()     # delivery id -> timestamp, oldest first
        self._busy: set[str] = set()
        self._lock = threading.Lock()

    def handle(self, headers, body: bytes) -> Verdict:
        s = self.settings
        delivery, stamp, signature = (headers.get(h) or "" for h in (DELIVERY_HEADER, TIMESTAMP_HEADER,
                                                                     SIGNATURE_HEADER))
        if not (delivery and stamp and signature):
            return Verdict(401, "refused", "unsigned (X-MLflow-Delivery-Id, -Timestamp and -Signature required)")
        expected = sign(s.secret, delivery, stamp, body)
        offered = [part.strip() for part in signature.split(" ")]       # several "v1,..." during a rotation
        if not any(hmac.compare_digest(expected, sig) for sig in offered):
            return Verdict(401, "refused", "bad signature")
        if not stamp.isdigit() or abs(self._clock() - int(stamp)) > s.window_s:
            return Verdict(401, "refused", f"timestamp outside the {s.window_s}s window (replay or clock skew)")
        try:
            uuid.UUID(delivery)
        except ValueError:
            return Verdict(400, "refused", "delivery id is not a UUID")
        try:
            doc = json.loads(body)
            event = f"{doc['entity']}.{doc['action']}"
            data = doc["data"]
            name, version = str(data["name"]), str(data["version"])
            alias = str(data.get("alias") or "")
        except (ValueError, KeyError, TypeError):
            return Verdict(400, "refused", "not an MLflow webhook body (entity, action, data.name, data.version)")
        facts = dict(event=event, model=name, version=version, alias=alias or "-")
        if event not in s.events:
            return Verdict(422, "refused", f"event not relayed (relayed: {', '.join(s.events)})", **facts)
        with self._lock:
            self._forget()
            if delivery in self._seen or delivery in self._busy:
                return Verdict(409, "refused", "delivery already relayed (replay)", **facts)
            self._busy.add(delivery)
        verdict = None
        try:
            verdict = self._decide(event, name, version, alias, facts)
            return verdict
        finally:
            with self._lock:
                self._busy.discard(delivery)
                if verdict is not None and verdict.outcome in ("dispatched", "skipped"):
                    self._seen[delivery] = int(stamp)     # decided for good; a failed one may be retried

    def _decide(self, event: str, name: str, version: str, alias: str, facts: dict) -> Verdict:
        s = self.settings
        if event == ALIAS_CREATED and alias not in s.aliases:
            return Verdict(200, "skipped", f"alias not relayed (relayed: {', '.join(s.aliases)})", **facts)
        if s.model_filter and not fnmatch.fnmatchcase(name, s.model_filter):
            return Verdict(200, "skipped", f"model outside --model-filter {s.model_filter!r}", **facts)
        request = dispatch_request(s, {"model": name, "version": version, "alias": alias})
        try:
            status = self._send(request)
        except OSError as err:
            return Verdict(502, "failed", f"GitHub did not answer ({type(err).__name__})", **facts)
        if status != 204:
            return Verdict(502, "failed", f"GitHub answered {status} (expected 204)", **facts)
        return Verdict(200, "dispatched", f"{s.event_type} -> {s.repository}", **facts)

    def _forget(self) -> None:
        """Drop ids whose timestamp the window check already refuses: memory bounded by the window."""
        horizon = self._clock() - 2 * self.settings.window_s
        while self._seen and next(iter(self._seen.values())) < horizon:
            self._seen.popitem(last=False)


def _send(request: urllib.request.Request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=15) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def log_line(delivery: str, verdict: Verdict) -> str:
    from mlstep.redact import scrub

    fields = (f"delivery={delivery or '-'} event={verdict.event} model={verdict.model} version={verdict.version} "
              f"alias={verdict.alias} -> {verdict.status} {verdict.outcome}: {verdict.reason}")
    return "mlstep relay: " + " ".join(scrub(fields).split())


def make_server(relay: Relay, log: Callable[[str], None] | None = None) -> ThreadingHTTPServer:
    """An HTTP server on ``relay.settings.host:port`` (port 0: a free one): POST /webhook, GET /health."""
    log = log or (lambda line: print(line, file=sys.stderr, flush=True))
    secret, token = relay.settings.secret, relay.settings.token

    class Handler(BaseHTTPRequestHandler):
        server_version = "mlstep-relay"
        protocol_version = "HTTP/1.1"

        def do_GET(self):  # noqa: N802 - http.server's naming
            self._answer(200 if self.path == "/health" else 404, {"status": "ok"} if self.path == "/health"
                         else {"error": "not found"})

        def do_POST(self):  # noqa: N802
            delivery = (self.headers.get(DELIVERY_HEADER) or "")[:64]
            if self.path != PATH:
                verdict = Verdict(404, "refused", f"unknown path (POST {PATH})")
                self.close_connection = True
            else:
                length = self.headers.get("Content-Length") or ""
                if not length.isdigit() or int(length) > MAX_BODY:
                    verdict = Verdict(413 if length.isdigit() else 411, "refused", "body length missing or too large")
                    self.close_connection = True        # the unread body must not be taken for a next request
                else:
                    verdict = relay.handle(self.headers, self.rfile.read(int(length)))
            line = log_line(delivery, verdict)
            for value in (secret, token):     # belt and braces: neither is ever part of a verdict
                line = line.replace(value, "***")
            log(line)
            self._answer(verdict.status, {"outcome": verdict.outcome, "reason": verdict.reason})

        def _answer(self, status: int, doc: dict):
            body = json.dumps(doc).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):   # http.server's access log: replaced by one line per delivery
            pass

    return ThreadingHTTPServer((relay.settings.host, relay.settings.port), Handler)


def serve(settings: RelaySettings) -> None:
    """Run until interrupted; the first stderr line names the listening URL."""
    try:
        server = make_server(Relay(settings))
    except OSError as err:
        raise UsageError(f"cannot listen on {settings.host}:{settings.port} ({err.strerror or err})") from None
    host, port = server.server_address[:2]
    events = ",".join(settings.events)
    print(f"mlstep relay: listening on http://{host}:{port}{PATH} (events {events}; aliases "
          f"{','.join(settings.aliases)}; model filter {settings.model_filter or '*'}) -> "
          f"repository_dispatch {settings.event_type} to {settings.repository} via {settings.api_url}",
          file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()


def words(values) -> tuple[str, ...]:
    """Repeated flags and comma lists alike: ("a,b", "c") -> ("a", "b", "c")."""
    return tuple(w.strip() for v in values or () for w in str(v).split(",") if w.strip())


def settings_from(repository: str, *, api_url: str | None, event_type: str, events, aliases,
                  model_filter: str | None, window_s: int, host: str, port: int, env=None) -> RelaySettings:
    """Flags + environment -> settings. The secret and the token are read from ``env`` only (never a flag:
    flags show up in process lists and shell history)."""
    import os

    env = os.environ if env is None else env
    token = next((env[name] for name in TOKEN_ENVS if env.get(name)), "")
    api = api_url or env.get("GITHUB_API_URL") or "https://api.github.com"
    return RelaySettings(repository=repository, secret=env.get(SECRET_ENV, ""), token=token, api_url=api,
                         event_type=event_type, events=words(events) or (ALIAS_CREATED,),
                         aliases=words(aliases) or ("candidate",), model_filter=model_filter or None,
                         window_s=window_s, host=host, port=port)
