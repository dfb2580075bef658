"""``mlstep relay`` end to end: a real ``mlflow server`` (sqlite) whose webhook points at the relay (the console
script in a subprocess), and a local GitHub API receiver that records the exact request the relay sends.

Deliveries the test signs itself use MLflow's own signing function (the scheme the relay must accept).
Every wait is on an event (a queue with a timeout), never on time.
"""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

SECRET = "whsec-relay-test-8c1f2b"
TOKEN = "ghp_relaytesttoken0123456789"
REPO = "acme/models"
MLSTEP = [str(Path(sys.executable).parent / "mlstep")]
WAIT = 300                  # an event wait's hang guard (a busy machine delays deliveries, never loses them)


class Receiver:
    """GitHub's REST API as far as repository_dispatch goes: records each request, answers ``status``."""

    def __init__(self):
        self.requests: queue.Queue = queue.Queue()
        self.status = 204
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.requests.put({"method": "POST", "path": self.path, "headers": dict(self.headers),
                                    "body": body})
                self.send_response(outer.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class RelayProcess:
    """``mlstep relay`` as users run it; its stderr lines arrive on ``lines`` (and are all kept in ``log``)."""

    def __init__(self, api_url: str, *flags: str):
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "GITHUB_", "MLSTEP_"))}
        env |= {"MLSTEP_WEBHOOK_SECRET": SECRET, "GITHUB_TOKEN": TOKEN}
        self.proc = subprocess.Popen([*MLSTEP, "relay", "--repository", REPO, "--api-url", api_url, "--port", "0",
                                      *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        first = self.next_line()
        assert "listening on http://" in first, first
        self.url = first.split("listening on ", 1)[1].split()[0]

    def _read(self):
        for line in self.proc.stderr:
            self.log.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def next_line(self) -> str:
        line = self.lines.get(timeout=WAIT)
        assert line is not None, f"relay exited: {''.join(self.log)}"
        return line

    def close(self) -> str:
        self.proc.terminate()
        out, _ = self.proc.communicate(timeout=30)
        return out + "".join(self.log)


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def relay(receiver):
    r = RelayProcess(receiver.url, "--alias", "candidate", "--model-filter", "relay-*")
    yield r
    everything = r.close()
    assert SECRET not in everything and TOKEN not in everything


@pytest.fixture(autouse=True)
def github_ok(receiver):
    receiver.status = 204
    yield
    assert receiver.requests.empty(), "a request nobody expected reached the GitHub API"


def expect_dispatch(receiver: Receiver, model: str, version: str, alias: str) -> None:
    """The exact repository_dispatch request GitHub documents."""
    got = receiver.requests.get(timeout=WAIT)
    headers = {k.lower(): v for k, v in got["headers"].items()}
    assert got["method"] == "POST"
    assert got["path"] == f"/repos/{REPO}/dispatches"
    assert headers["accept"] == "application/vnd.github+json"
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["x-github-api-version"] == "2022-11-28"
    assert headers["content-type"] == "application/json"
    assert json.loads(got["body"]) == {"event_type": "mlstep-optimize",
                                       "client_payload": {"model": model, "version": version, "alias": alias}}


def next_verdict(relay: RelayProcess, delivery: str | None = None) -> str:
    line = relay.next_line()
    assert line.startswith("mlstep relay: delivery="), line
    if delivery is not None:
        assert f"delivery={delivery} " in line, line
    return line


# ------------------------------------------------------------------------------- through a real mlflow server

@pytest.fixture(scope="module")
def webhook_mlflow(start_mlflow_server, tmp_path_factory, relay):
    """A private mlflow server that may call http://127.0.0.1 (MLflow refuses private hosts by default), with
    a webhook on alias creation pointing at the relay."""
    from mlflow import MlflowClient

    env = {"MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true"}
    with start_mlflow_server(tmp_path_factory.mktemp("mlflow-webhooks"), env=env) as (uri, stop):
        client = MlflowClient(tracking_uri=uri, registry_uri=uri)
        client.create_webhook(name="mlstep-relay", url=relay.url, events=["model_version_alias.created"],
                              secret=SECRET)
        yield client
        stop()


def register(client, name: str) -> str:
    client.create_registered_model(name)
    run = client.create_run(client.create_experiment(f"exp-{name}"))
    return client.create_model_version(name, f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version


def test_alias_set_in_mlflow_dispatches_to_github(webhook_mlflow, relay, receiver):
    version = register(webhook_mlflow, "relay-bert")
    webhook_mlflow.set_registered_model_alias("relay-bert", "candidate", version)
    expect_dispatch(receiver, "relay-bert", str(version), "candidate")
    line = next_verdict(relay)
    assert "event=model_version_alias.created model=relay-bert" in line and "200 dispatched" in line, line

    webhook_mlflow.set_registered_model_alias("relay-bert", "champion", version)      # another alias
    assert "200 skipped: alias not relayed" in next_verdict(relay)
    other = register(webhook_mlflow, "other-model")                                   # outside --model-filter
    webhook_mlflow.set_registered_model_alias("other-model", "candidate", other)
    assert "model=other-model" in (line := next_verdict(relay)) and "200 skipped: model outside" in line


# ------------------------------------------------------------------------------------------ signed by the test

def post(relay: RelayProcess, body: bytes, headers: dict) -> int:
    request = urllib.request.Request(relay.url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", **headers})
    try:
        with urllib.request.urlopen(request, timeout=WAIT) as answer:
            return answer.status
    except urllib.error.HTTPError as err:
        return err.code


def delivery(event: str = "model_version_alias.created", data: dict | None = None, secret: str = SECRET,
             age_s: int = 0) -> tuple[bytes, dict]:
    """A delivery as MLflow makes it (``mlflow.webhooks.delivery``), signed with MLflow's own function."""
    from mlflow.webhooks.delivery import _generate_hmac_signature

    entity, action = event.rsplit(".", 1)
    payload = json.dumps({"entity": entity, "action": action, "timestamp": "2026-11-27T00:00:00+00:00",
                          "data": data or {"name": "relay-gpt2", "alias": "candidate", "version": "7"}})
    did, stamp = str(uuid.uuid4()), str(int(time.time()) - age_s)
    return payload.encode(), {"X-MLflow-Delivery-Id": did, "X-MLflow-Timestamp": stamp,
                              "X-MLflow-Signature": _generate_hmac_signature(secret, did, stamp, payload)}


def test_replay_of_a_relayed_delivery_is_refused(relay, receiver):
    body, headers = delivery()
    assert post(relay, body, headers) == 200
    expect_dispatch(receiver, "relay-gpt2", "7", "candidate")
    next_verdict(relay, headers["X-MLflow-Delivery-Id"])
    assert post(relay, body, headers) == 409
    assert "409 refused: delivery already relayed (replay)" in next_verdict(relay)


def test_bad_unsigned_and_stale_deliveries_are_refused(relay):
    body, headers = delivery(secret="not-the-secret")
    assert post(relay, body, headers) == 401
    assert "401 refused: bad signature" in next_verdict(relay)

    body, headers = delivery()
    assert post(relay, body + b" ", headers) == 401               # the body changed after signing
    assert "bad signature" in next_verdict(relay)

    del headers["X-MLflow-Signature"]
    assert post(relay, body, headers) == 401
    assert "401 refused: unsigned" in next_verdict(relay)

    body, headers = delivery(age_s=3600)                          # signed correctly, an hour old
    assert post(relay, body, headers) == 401
    assert "timestamp outside the 300s window" in next_verdict(relay)


def test_unknown_event_and_malformed_body_are_refused(relay):
    body, headers = delivery("model_version_tag.set", {"name": "relay-x", "version": "1", "key": "k", "value": "v"})
    assert post(relay, body, headers) == 422
    line = next_verdict(relay)
    assert "event=model_version_tag.set" in line and "422 refused: event not relayed" in line

    from mlflow.webhooks.delivery import _generate_hmac_signature

    did, stamp = str(uuid.uuid4()), str(int(time.time()))
    assert post(relay, b"[1, 2]", {"X-MLflow-Delivery-Id": did, "X-MLflow-Timestamp": stamp,
                                   "X-MLflow-Signature": _generate_hmac_signature(SECRET, did, stamp, "[1, 2]")}) == 400
    assert "400 refused: not an MLflow webhook body" in next_verdict(relay)


def test_github_failure_is_retryable_with_the_same_delivery(relay, receiver):
    """GitHub answers 500: the relay answers 502 (MLflow retries 5xx with the same delivery id) and does not
    remember the id, so the retry is relayed rather than refused as a replay."""
    body, headers = delivery(data={"name": "relay-retry", "alias": "candidate", "version": "2"})
    receiver.status = 500
    assert post(relay, body, headers) == 502
    receiver.requests.get(timeout=WAIT)
    assert "502 failed: GitHub answered 500" in next_verdict(relay)
    receiver.status = 204
    assert post(relay, body, headers) == 200
    expect_dispatch(receiver, "relay-retry", "2", "candidate")
    assert "200 dispatched" in next_verdict(relay)


def test_bad_settings_are_one_line_exit_2(receiver):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLSTEP_", "GITHUB_"))} | {"GITHUB_TOKEN": TOKEN}
    proc = subprocess.run([*MLSTEP, "relay", "-r", REPO, "--api-url", receiver.url], env=env, capture_output=True,
                          text=True, timeout=WAIT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "mlstep: error: MLSTEP_WEBHOOK_SECRET is not set: the MLflow webhook's secret (the relay refuses unsigned "
        "deliveries)"]

    port = str(receiver.server.server_address[1])                  # taken: the receiver listens there
    proc = subprocess.run([*MLSTEP, "relay", "-r", REPO, "--port", port], env=env | {"MLSTEP_WEBHOOK_SECRET": SECRET},
                          capture_output=True, text=True, timeout=WAIT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"mlstep: error: cannot listen on 127.0.0.1:{port} (Address already "
                                                f"in use)"]
    assert SECRET not in proc.stdout + proc.stderr and TOKEN not in proc.stdout + proc.stderr


# ------------------------------------------------------------------------------------------ the decision alone

def test_new_version_events_and_bounded_memory(receiver):
    """``--event model_version.created``: the payload's alias is empty; delivery ids are forgotten once the
    window refuses them anyway (the clock is the relay's own, advanced by the test)."""
    from mlstep.relay import Relay, settings_from

    settings = settings_from(REPO, api_url=receiver.url, event_type="mlstep-optimize",
                             events=["model_version.created"], aliases=None, model_filter=None, window_s=300,
                             host="127.0.0.1", port=0, env={"MLSTEP_WEBHOOK_SECRET": SECRET, "GITHUB_TOKEN": TOKEN})
    now = [time.time()]
    relay = Relay(settings, clock=lambda: now[0])
    body, headers = delivery("model_version.created", {"name": "relay-new", "version": "4", "source": "models:/m-1",
                                                       "run_id": None, "tags": {}, "description": None})
    verdict = relay.handle(headers, body)
    assert (verdict.status, verdict.outcome, verdict.alias) == (200, "dispatched", "-")
    expect_dispatch(receiver, "relay-new", "4", "")
    assert relay.handle(headers, body).status == 409
    body2, headers2 = delivery()                                   # alias events are not relayed by this one
    assert relay.handle(headers2, body2).status == 422
    now[0] += 1000                                                 # past twice the window
    body3, headers3 = delivery("model_version.created", {"name": "relay-new", "version": "5"}, age_s=-1000)
    assert relay.handle(headers3, body3).outcome == "dispatched"
    expect_dispatch(receiver, "relay-new", "5", "")
    assert list(relay._seen) == [headers3["X-MLflow-Delivery-Id"]]
