"""Registration converges to exactly one version per (key, variant): lost replies, client retries, N
concurrent steps, a store that dies at any point, re-runs. A real ``mlflow server`` behind a fault-injecting
proxy; every wait is on an event (a request seen, a process ended), never on time."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

pytest.importorskip("mlflow")

from mlstep import registry
from mlstep.errors import BadInputError

from registry_helpers import OPTIONS_HASH, step_publish
from registry_helpers import client, fast_retries, files, proxy  # noqa: F401  (fixtures)

CREATE = "/model-versions/create"
ALIAS = "/registered-models/alias"
HELPER = Path(__file__).with_name("registry_helpers.py")


def by_variant(client, name: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for v in client.search_model_versions(f"name = '{name}'"):
        out.setdefault(v.tags.get("mlstep.variant", "source"), []).append(str(v.version))
    return {k: sorted(vs, key=int) for k, vs in out.items()}


def variants(files) -> dict[str, Path]:
    return {"fp32": files["fp32"], "fp16": files["fp16"]}


def assert_settled(client, name: str, experiment_ids=None) -> None:
    """One version per variant; no RUNNING run and no PENDING LoggedModel of mlstep left."""
    found = by_variant(client, name)
    assert {k: len(v) for k, v in found.items() if k != "source"} == {"fp32": 1, "fp16": 1}, found
    exp = client.get_experiment_by_name("mlstep")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")
    assert [r.info.run_id for r in runs] == []
    pending = [m.model_id for m in client.search_logged_models([exp.experiment_id]) if str(m.status).endswith("PENDING")]
    assert pending == []


@pytest.mark.parametrize("action", ["lose", "fail503", "reset"])
def test_a_lost_reply_to_create_model_version_leaves_one_version(action, proxy, fast_retries, client, files):
    """lose: the server created the version, the reply never came, the client retried (a second version);
    fail503: the same with a 503 answer; reset: the server never saw the first try."""
    name = f"lost-{action}"
    proxy.add("POST", CREATE, action)
    pub = step_publish(registry.Store(proxy.uri), str(files["source"]), name, variants(files))
    assert pub.error is None, pub.error
    assert proxy.count("POST", CREATE) == 3              # fp32 twice (the fault, the client's retry), fp16 once
    assert {v: r.status for v, r in pub.registrations.items()} == {"fp32": "registered", "fp16": "registered"}
    duplicated = action != "reset"
    assert pub.removed == ([f"models:/{name}/2"] if duplicated else [])
    assert pub.registrations["fp32"].uri == f"models:/{name}/1"
    assert_settled(client, name)
    assert client.get_model_version_by_alias(name, "optimized-fp32").version == "1"

    again = step_publish(registry.Store(proxy.uri), str(files["source"]), name, variants(files))
    assert {v: (r.status, r.uri) for v, r in again.registrations.items()} == {
        v: ("existing", r.uri) for v, r in pub.registrations.items()}
    assert proxy.count("POST", CREATE) == 3              # the re-run created nothing
    assert_settled(client, name)


@pytest.mark.parametrize("fragment", ["/runs/create", "/logged-models"])
def test_a_lost_reply_to_another_create_leaves_nothing_running_or_pending(fragment, proxy, fast_retries, client,
                                                                         files):
    """A retried create-run or create-LoggedModel made two: the extra run is ended FAILED, the extra
    LoggedModel (never uploaded) is marked FAILED; still one version per variant."""
    name = f"lost-{fragment.strip('/').replace('/', '-')}"
    proxy.add("POST", fragment, "lose")
    pub = step_publish(registry.Store(proxy.uri), str(files["source"]), name, variants(files))
    assert pub.error is None, pub.error
    assert proxy.count("POST", fragment) >= 2
    assert_settled(client, name)


def test_a_create_request_that_arrives_after_the_retry(proxy, fast_retries, client, files):
    """The first create is held until the client's retry arrives (the client gave up on it), then delivered:
    a version lands late. Whichever step sees it (this one or its re-run) removes it."""
    fast_retries.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")    # the held request outlives it: a retry comes
    name = "late-create"
    held = proxy.add("POST", CREATE, "hold")
    retried = proxy.seen("POST", CREATE, 2)
    threading.Thread(target=lambda: (retried.wait(), held.release.set()), daemon=True).start()
    pub = step_publish(registry.Store(proxy.uri), str(files["source"]), name, variants(files))
    assert pub.error is None, pub.error
    assert held.release.is_set()
    held_done = proxy.seen("POST", CREATE, 3)            # fp16's create comes after the held one was released
    assert held_done.is_set()
    step_publish(registry.Store(proxy.uri), str(files["source"]), name, variants(files))
    assert_settled(client, name)


def test_five_concurrent_steps_on_one_source(proxy, mlflow_server, client, files, tmp_path):
    """Five processes publish the same source at once; a barrier in the proxy holds the five first creates
    until all arrived, so each one searched, found nothing and created: the race is certain, not likely.
    A second barrier holds their five first alias requests: five first inserts of one alias at once (the
    store refuses all but one; each step must still end with the alias on the kept version)."""
    name = "five-at-once"
    proxy.add("POST", CREATE, "barrier", times=5)
    proxy.add("POST", ALIAS, "barrier", times=5)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLSTEP_"))}
    env |= {"MLSTEP_REGISTRY_RETRIES": "2", "MLSTEP_REGISTRY_BACKOFF": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HELPER.parent), env.get("PYTHONPATH")]))}
    outs = [tmp_path / f"out{i}.json" for i in range(5)]
    procs = [subprocess.Popen([sys.executable, str(HELPER), proxy.uri, str(files["source"]), name,
                               str(files["fp32"]), str(files["fp16"]), str(out)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for out in outs]
    for proc in procs:
        output, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, output
    results = [json.loads(out.read_text()) for out in outs]
    assert [r["error"] for r in results] == [None] * 5
    assert proxy.count("POST", CREATE) >= 6              # five fp32 creates (the barrier), then fp16's
    uris = {v: {r["registrations"][v]["uri"] for r in results} for v in ("fp32", "fp16")}
    assert uris["fp32"] == {f"models:/{name}/1"} and len(uris["fp16"]) == 1, uris
    assert sorted(s for r in results for s in (r["registrations"]["fp32"]["status"],)) == \
        ["existing"] * 4 + ["registered"]
    assert sum(len(r["removed"]) for r in results) == proxy.count("POST", CREATE) - 2
    assert_settled(client, name)
    assert proxy.count("POST", ALIAS) >= 10              # every step set both aliases (the barrier's five at once)
    assert client.get_model_version_by_alias(name, "optimized-fp32").version == "1"
    assert f"models:/{name}/{client.get_model_version_by_alias(name, 'optimized-fp16').version}" == uris["fp16"].pop()


@pytest.mark.parametrize("method, fragment", [
    ("POST", "/runs/create"), ("POST", "/logged-models"), ("PUT", "/mlflow-artifacts/artifacts"),
    ("POST", CREATE), ("POST", ALIAS), ("POST", "/runs/update"),
])
def test_the_store_dies_at_any_point_and_the_rerun_completes(method, fragment, proxy, fast_retries, client, files,
                                                             tmp_path):
    """A step in its own process meets a dead store (every request from that point on goes unanswered):
    one line of error, what exists said; the store comes back; the re-run on this host ends the dead step's
    run FAILED, fails its PENDING LoggedModels and registers exactly one version per variant."""
    name = f"dies-{fragment.strip('/').replace('/', '-')}-{method.lower()}"
    proxy.add(method, fragment, "die")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLSTEP_"))}
    env |= {"MLSTEP_REGISTRY_RETRIES": "1", "MLSTEP_REGISTRY_BACKOFF": "0", "MLFLOW_DISABLE_TELEMETRY": "true",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HELPER.parent), env.get("PYTHONPATH")]))}
    out = tmp_path / "dead.json"
    proc = subprocess.run([sys.executable, str(HELPER), proxy.uri, str(files["source"]), name, str(files["fp32"]),
                           str(files["fp16"]), str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    dead = json.loads(out.read_text())
    assert dead["error"] and "did not answer" in dead["error"], dead
    assert proxy.dead
    proxy.revive()

    pub = step_publish(registry.Store(proxy.uri), str(files["source"]), name, variants(files))
    assert pub.error is None, pub.error
    if dead["run_id"]:
        assert client.get_run(dead["run_id"]).info.status == "FAILED"
    assert_settled(client, name)


def test_models_latest_settles_and_a_variant_is_not_a_source(mlflow_server, fast_retries, client, files, tmp_path):
    name = "settles"
    version, run_id = register_source(mlflow_server, files["source"], name)
    store = registry.Store(mlflow_server)
    first = step_publish(store, f"models:/{name}/latest", name, variants(files))
    assert {r.status for r in first.registrations.values()} == {"registered"}
    again = step_publish(store, f"models:/{name}/latest", name, variants(files))
    assert {r.status for r in again.registrations.values()} == {"existing"}
    assert by_variant(client, name) == {"source": ["1"], "fp32": ["2"], "fp16": ["3"]}
    with registry.materialize(f"models:/{name}/latest", store) as resolved:
        assert resolved.uri == f"models:/{name}/1"
    for uri in (f"models:/{name}/3", f"models:/{name}@optimized-fp16",
                f"models:/{client.get_model_version(name, '2').source.removeprefix('models:/')}",
                f"runs:/{first.run_id}/report.json"):
        with pytest.raises(BadInputError) as refused:
            with registry.materialize(uri, store):
                pass
        assert f"models:/{name}/1" in str(refused.value) and "instead" in str(refused.value), str(refused.value)


def test_same_bytes_by_three_uris_is_one_source(mlflow_server, fast_retries, client, files):
    name = "three-uris"
    version, run_id = register_source(mlflow_server, files["source"], name)
    model_id = client.get_model_version(name, version).source.removeprefix("models:/")
    store = registry.Store(mlflow_server)
    digests = set()
    for uri in (f"models:/{name}/{version}", f"runs:/{run_id}/model", f"models:/{model_id}"):
        with registry.materialize(uri, store) as resolved:
            digests.add(resolved.sha256)
        pub = step_publish(store, uri, name, variants(files))
        assert pub.error is None
    assert len(digests) == 1
    assert by_variant(client, name) == {"source": ["1"], "fp32": ["2"], "fp16": ["3"]}
    key = registry.idempotency_key(digests.pop(), OPTIONS_HASH)
    assert {client.get_model_version(name, n).tags["mlstep.key"] for n in ("2", "3")} == {key}


def register_source(tracking: str, path: Path, name: str) -> tuple[str, str]:
    import mlflow
    import mlflow.onnx
    import onnx

    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    with mlflow.start_run() as run:
        info = mlflow.onnx.log_model(onnx.load(str(path)), name="model", registered_model_name=name,
                                     pip_requirements=["onnx"])
    return str(info.registered_model_version), run.info.run_id
