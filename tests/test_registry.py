"""``mlstep optimize`` / ``mlstep promote`` against MLflow: a real ``mlflow server`` (the session fixture
``mlflow_server``) and the embedded default (a sqlite file in the working folder). No mocks.

The CLI runs as users run it (a subprocess); the tests use MLflow's own client only to set the scene
(register a source model) and to inspect what the step left in the registry.
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest

from mlstep import registry
from mlstep.export import ExportSpec
from mlstep.optimizer.options import OptimizeOptions

mlflow = pytest.importorskip("mlflow")
import mlflow.onnx  # noqa: E402
from mlflow import MlflowClient  # noqa: E402
from conftest import cancellation_model

_SCRIPT = Path(sys.executable).parent / "mlstep"
MLSTEP = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-c", "from mlstep.cli.main import app; app()"]
CI = {"GITHUB_REPOSITORY": "acme/models", "GITHUB_RUN_ID": "4242", "GITHUB_SHA": "0123abcd" * 5,
      "GITHUB_SERVER_URL": "https://github.com"}
QUICK = ["--skip-benchmark"]


def mlstep(*args, env: dict | None = None, cwd: Path | None = None, tracking: str | None = None,
           timeout: float = 300, wait: bool = True):
    """Run the CLI with a clean MLflow environment: only what the test gives (plus small retry budgets)."""
    base = {k: v for k, v in os.environ.items()
            if not k.startswith(("MLFLOW_", "MLSTEP_", "GITHUB_"))}
    base |= {"MLFLOW_DISABLE_TELEMETRY": "true", "MLSTEP_REGISTRY_RETRIES": "1", "MLSTEP_REGISTRY_BACKOFF": "0"}
    if tracking:
        base["MLFLOW_TRACKING_URI"] = tracking
    command = MLSTEP + [str(a) for a in args]
    if not wait:
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                env=base | (env or {}), cwd=cwd)
    return subprocess.run(command, capture_output=True, text=True, env=base | (env or {}), cwd=cwd, timeout=timeout)


def one_line_error(proc, code: int = 2) -> str:
    lines = proc.stderr.splitlines()
    assert proc.returncode == code, (proc.returncode, proc.stderr, proc.stdout)
    assert len(lines) == 1 and lines[0].startswith("mlstep: error: "), proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    return lines[0]


def register_source(tracking: str, path: Path, name: str, alias: str | None = "candidate") -> tuple[str, str]:
    """Log ``path`` with the ONNX flavor (MLflow 3 style) and register it; returns (version, run id)."""
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    with mlflow.start_run() as run:
        info = mlflow.onnx.log_model(onnx.load(str(path)), name="model", registered_model_name=name,
                                     pip_requirements=["onnx"])
    version = str(info.registered_model_version)
    if alias:
        MlflowClient(tracking, tracking).set_registered_model_alias(name, alias, version)
    return version, run.info.run_id


def versions(client: MlflowClient, name: str) -> dict[str, object]:
    return {str(v.version): v for v in client.search_model_versions(f"name = '{name}'")}


def all_version_count(client: MlflowClient) -> int:
    return sum(len(versions(client, m.name)) for m in client.search_registered_models())


@pytest.fixture(scope="module")
def client(mlflow_server) -> MlflowClient:
    return MlflowClient(tracking_uri=mlflow_server, registry_uri=mlflow_server)


@pytest.fixture(scope="module")
def tiny_bert(exported) -> Path:
    return exported(ExportSpec("bert"))


@pytest.fixture(scope="module")
def first_step(mlflow_server, client, tiny_bert, tmp_path_factory):
    """``mlstep optimize models:/tiny-bert@candidate`` once, in a CI-like environment."""
    register_source(mlflow_server, tiny_bert, "tiny-bert")
    work = tmp_path_factory.mktemp("first-step")
    summary = work / "summary.md"
    summary.write_text("# earlier step\n")
    # Real latency gates run here; a generous threshold keeps a loaded CI machine from flaking registration.
    # --form fused: the registered variants hold Attention whatever a loaded machine's timings would choose (the
    # measured choice reaching the run is tests/test_forms.py's subject).
    proc = mlstep("optimize", "models:/tiny-bert@candidate", "-o", work / "out", "--max-slowdown", "1.0",
                  "--form", "fused", tracking=mlflow_server, env=CI | {"GITHUB_STEP_SUMMARY": str(summary)})
    return proc, work / "out", summary


# ------------------------------------------------------------------------------------------ happy path

def test_registered_model_gets_two_gate_passed_versions(first_step, client, tmp_path):
    proc, out, summary = first_step
    assert proc.returncode == 0, proc.stderr + proc.stdout
    assert proc.stderr == "", proc.stderr          # quiet when stderr is not a terminal (no mlflow chatter)
    report = json.loads((out / "report.json").read_text())
    record = report["mlflow"]
    # The resolution is recorded: the alias named version 1.
    assert record["source"]["requested"] == "models:/tiny-bert@candidate"
    assert record["source"]["uri"] == "models:/tiny-bert/1" and record["source"]["alias"] == "candidate"
    assert report["variants"]["fp32"]["registered"] == "models:/tiny-bert/2"
    assert report["variants"]["fp16"]["registered"] == "models:/tiny-bert/3"
    assert {v: r["status"] for v, r in record["registrations"].items()} == {"fp32": "registered", "fp16": "registered"}
    assert "models:/tiny-bert/2" in proc.stdout and "models:/tiny-bert@candidate -> models:/tiny-bert/1" in proc.stdout

    found = versions(client, "tiny-bert")
    assert sorted(found) == ["1", "2", "3"]
    options_hash = report["options"]["options_hash"]
    assert options_hash == OptimizeOptions(float16=True).hash({"form": "fused"})   # a forced form is in the key
    for number, variant in (("2", "fp32"), ("3", "fp16")):
        version = found[number]
        tags = dict(version.tags)
        assert len(tags.pop("mlstep.sha256")) == 64 and len(tags.pop("mlstep.source_sha256")) == 64
        assert tags.pop("mlstep.key") == registry.idempotency_key(record["source"]["sha256"], options_hash)
        assert tags == {"mlstep.variant": variant, "mlstep.source": "models:/tiny-bert/1",
                        "mlstep.options_hash": options_hash, "mlstep.gates": "passed"}
        assert version.run_id == record["run_id"]
        assert version.source.startswith("models:/m-")          # an MLflow 3 LoggedModel
        assert variant in version.description and "parity" in version.description
    assert client.get_model_version_by_alias("tiny-bert", "optimized-fp32").version == "2"
    assert client.get_model_version_by_alias("tiny-bert", "optimized-fp16").version == "3"
    assert client.get_model_version_by_alias("tiny-bert", "candidate").version == "1"

    # The registered variant is a loadable ONNX flavor model.
    local = mlflow.artifacts.download_artifacts(artifact_uri="models:/tiny-bert/3", dst_path=str(tmp_path / "dl"),
                                                tracking_uri=client._tracking_client.tracking_uri)
    mlmodel = (Path(local) / "MLmodel").read_text()
    assert "onnx:" in mlmodel
    model = onnx.load(str(Path(local) / "model.onnx"))
    assert any(n.op_type == "Attention" for n in model.graph.node)

    run = client.get_run(record["run_id"])
    params = run.data.params
    for key in OptimizeOptions().as_params():
        assert key in params, key
    assert params["float16"] == "True" and params["options_hash"] == options_hash
    assert params["detected_model_type"] == "bert" and params["detected_num_heads"] == "4"
    assert params["detected_hidden_size"] == "32" and params["source_uri"] == "models:/tiny-bert/1"
    metrics = run.data.metrics
    assert metrics["fp32.fusions.Attention"] == 2 and metrics["fp16.fusions.SkipLayerNormalization"] > 0
    assert metrics["fp32.parity.max_abs_diff"] < 1e-3 and metrics["fp32.gate.passed"] == 1
    assert metrics["fp32.latency_ms.median"] > 0 and metrics["baseline.latency_ms.median"] > 0
    assert metrics["fp32.speedup"] > 0 and metrics["optimizer_seconds"] > 0
    tags = run.data.tags
    assert tags["mlstep.source"] == "models:/tiny-bert/1" and tags["mlstep.source_alias"] == "candidate"
    assert tags["github.repository"] == "acme/models" and tags["github.run_id"] == "4242"
    assert tags["github.sha"] == CI["GITHUB_SHA"]
    assert tags["github.run_url"] == "https://github.com/acme/models/actions/runs/4242"
    assert tags["mlstep.gates"] == "passed" and run.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"report.json", "report.md"} <= artifacts
    logged = json.loads(Path(client.download_artifacts(record["run_id"], "report.json", str(tmp_path))).read_text())
    assert logged["variants"]["fp16"]["registered"] == "models:/tiny-bert/3"
    # Gate evidence the step wrote beside the report (benchmark JSON, plot) is logged with the run.
    extra = [p.relative_to(out) for p in out.rglob("*") if p.is_file()
             and p.relative_to(out).parts[0] not in ("fp32", "fp16") and p.name not in ("report.json", "report.md")]
    for rel in extra:
        folder = "evidence" if rel.parent == Path(".") else f"evidence/{rel.parent.as_posix()}"
        assert f"{folder}/{rel.name}" in {a.path for a in client.list_artifacts(record["run_id"], folder)}, rel

    text = summary.read_text()
    assert text.startswith("# earlier step\n") and "# mlstep optimize" in text and "models:/tiny-bert/2" in text


def test_rerun_registers_nothing_and_completes_a_half_done_registration(first_step, mlflow_server, client, tmp_path):
    proc, out, _ = first_step
    assert proc.returncode == 0, proc.stderr
    before = versions(client, "tiny-bert")

    # the first step's options again (its forced form is part of the registry key)
    again = mlstep("optimize", "models:/tiny-bert@candidate", "-o", tmp_path / "again", *QUICK, "--form", "fused",
                   tracking=mlflow_server)
    assert again.returncode == 0, again.stderr + again.stdout
    report = json.loads((tmp_path / "again" / "report.json").read_text())
    assert sorted(versions(client, "tiny-bert")) == sorted(before)
    assert {v: (r["status"], r["uri"]) for v, r in report["mlflow"]["registrations"].items()} == {
        "fp32": ("existing", "models:/tiny-bert/2"), "fp16": ("existing", "models:/tiny-bert/3")}
    assert report["variants"]["fp16"]["registered"] == "models:/tiny-bert/3" and "(existing)" in again.stdout

    # A registration that stopped half-way: fp32 exists, fp16 does not (and neither does its alias).
    client.delete_model_version("tiny-bert", "3")
    third = mlstep("optimize", "models:/tiny-bert@candidate", "-o", tmp_path / "third", *QUICK, "--form", "fused",
                   tracking=mlflow_server)
    assert third.returncode == 0, third.stderr + third.stdout
    report = json.loads((tmp_path / "third" / "report.json").read_text())
    regs = report["mlflow"]["registrations"]
    assert {k: regs["fp32"][k] for k in ("status", "uri", "alias")} == {
        "status": "existing", "uri": "models:/tiny-bert/2", "alias": "optimized-fp32"}
    assert regs["fp16"]["status"] == "registered" and regs["fp16"]["uri"] == "models:/tiny-bert/4"
    after = versions(client, "tiny-bert")
    assert sorted(after) == ["1", "2", "4"]
    assert [v.tags["mlstep.variant"] for k, v in sorted(after.items()) if k != "1"] == ["fp32", "fp16"]
    assert client.get_model_version_by_alias("tiny-bert", "optimized-fp16").version == "4"


def test_other_sources_resolve(mlflow_server, client, tiny_bert, tmp_path, monkeypatch):
    """runs:/RUN/PATH, models:/m-ID, models:/NAME/latest and a local file with --register-as."""
    from mlstep import registry

    version, run_id = register_source(mlflow_server, tiny_bert, "resolve-me", alias=None)
    model_id = client.get_model_version("resolve-me", version).source.removeprefix("models:/")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    store = registry.Registry()
    with registry.materialize(f"runs:/{run_id}/model", store) as got:
        assert got.kind == "run" and got.uri == f"runs:/{run_id}/model" and got.name == "resolve-me"
        assert got.local_path.suffix == ".onnx" and got.local_path.is_file()
        folder = got.local_path.parent
    assert not folder.exists()                   # the download lives as long as the step
    with registry.materialize(f"models:/{model_id}", store) as got:
        assert got.kind == "logged_model" and got.model_id == model_id and got.run_id == run_id
        assert got.name == "resolve-me" and got.local_path.is_file()
    with registry.materialize("models:/resolve-me/latest", store) as got:
        assert got.uri == f"models:/resolve-me/{version}"

    # A local file registers only with --register-as; its identity is its path and content hash.
    proc = mlstep("optimize", tiny_bert, "-o", tmp_path / "local", *QUICK, "-p", "fp32", "--register-as", "from-file",
                  "--alias-fp32", "fast", tracking=mlflow_server)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    found = versions(client, "from-file")
    assert list(found) == ["1"] and found["1"].tags["mlstep.source"].startswith(tiny_bert.resolve().as_uri() + "#sha256=")
    assert client.get_model_version_by_alias("from-file", "fast").version == "1"
    # A dry run writes nothing to MLflow.
    dry = mlstep("optimize", f"runs:/{run_id}/model", "-o", tmp_path / "dry", *QUICK, "--no-register",
                 tracking=mlflow_server)
    assert dry.returncode == 0, dry.stderr
    report = json.loads((tmp_path / "dry" / "report.json").read_text())
    assert report["mlflow"]["run_id"] is None and report["variants"]["fp32"]["registered"] is None
    assert list(versions(client, "resolve-me")) == [version]


# ------------------------------------------------------------------------------------------- failures

@pytest.mark.parametrize("uri, needle", [
    ("models:/tiny-bert/99", "not found"),
    ("models:/tiny-bert@no-such-alias", "not found"),
    ("models:/no-such-model/1", "not found"),
    ("runs:/0123456789abcdef0123456789abcdef/model", "not found"),
])
def test_unknown_sources_are_one_line_and_register_nothing(uri, needle, first_step, mlflow_server, client, tmp_path):
    before = all_version_count(client)
    runs_before = len(client.search_runs([e.experiment_id for e in client.search_experiments()]))
    proc = mlstep("optimize", uri, "-o", tmp_path / "out", tracking=mlflow_server)
    line = one_line_error(proc)
    assert needle in line and uri in line
    assert not (tmp_path / "out").exists()
    assert all_version_count(client) == before
    assert len(client.search_runs([e.experiment_id for e in client.search_experiments()])) == runs_before


def test_a_model_that_is_not_onnx(mlflow_server, client, tmp_path):
    mlflow.set_tracking_uri(mlflow_server)
    with mlflow.start_run() as run:
        mlflow.log_text("name: not onnx\n", "notonnx/MLmodel")
        mlflow.log_text("hello\n", "notonnx/readme.txt")
    client.create_registered_model("not-onnx")
    client.create_model_version("not-onnx", f"{run.info.artifact_uri}/notonnx", run_id=run.info.run_id)
    proc = mlstep("optimize", "models:/not-onnx/1", "-o", tmp_path / "out", tracking=mlflow_server)
    assert "ONNX" in one_line_error(proc) or "no .onnx" in proc.stderr
    assert list(versions(client, "not-onnx")) == ["1"]


def test_a_server_that_does_not_answer(tmp_path):
    with socket.socket() as sock:            # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    start = time.monotonic()
    proc = mlstep("optimize", "models:/tiny-bert@candidate", "-o", tmp_path / "out", tracking=f"http://127.0.0.1:{port}",
                  env={"MLSTEP_REGISTRY_RETRIES": "2", "MLSTEP_REGISTRY_BACKOFF": "1"})
    elapsed = time.monotonic() - start
    line = one_line_error(proc)
    assert "did not answer" in line and "2 retries" in line and f"127.0.0.1:{port}" in line
    assert elapsed < 60 and not (tmp_path / "out").exists()


def test_two_steps_at_once(mlflow_server, client, tiny_bert, tmp_path):
    for name in ("conc-a", "conc-b"):
        register_source(mlflow_server, tiny_bert, name)
    procs = {name: mlstep("optimize", f"models:/{name}@candidate", "-o", tmp_path / name, *QUICK,
                          tracking=mlflow_server, wait=False) for name in ("conc-a", "conc-b")}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=300)
        assert proc.returncode == 0, (name, stderr, stdout)
    for name in ("conc-a", "conc-b"):
        found = versions(client, name)
        assert sorted(found) == ["1", "2", "3"], name
        assert {found[n].tags["mlstep.variant"] for n in ("2", "3")} == {"fp32", "fp16"}
        assert {found[n].tags["mlstep.source"] for n in ("2", "3")} == {f"models:/{name}/1"}
        report = json.loads((tmp_path / name / "report.json").read_text())
        assert {v["registered"] for v in report["variants"].values()} == {f"models:/{name}/2", f"models:/{name}/3"}


def test_failed_gate_registers_only_the_passing_variant_and_promote_checks_the_gate(mlflow_server, client, tmp_path):
    source = cancellation_model(tmp_path / "cancel.onnx")
    proc = mlstep("optimize", source, "-o", tmp_path / "out", *QUICK, "--register-as", "gated", tracking=mlflow_server)
    assert proc.returncode == 1, proc.stderr + proc.stdout
    assert "fp16 parity" in one_line_error(proc, 1)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["variants"]["fp32"]["registered"] == "models:/gated/1"
    assert report["variants"]["fp16"]["registered"] is None
    assert report["mlflow"]["registrations"]["fp16"]["status"] == "skipped"
    assert list(versions(client, "gated")) == ["1"]
    assert client.get_run(report["mlflow"]["run_id"]).data.tags["mlstep.gates"] == "failed"

    ok = mlstep("promote", "models:/gated/1", "--alias", "champion", tracking=mlflow_server)
    assert ok.returncode == 0, ok.stderr
    assert "models:/gated@champion -> models:/gated/1" in ok.stdout
    assert client.get_model_version_by_alias("gated", "champion").version == "1"

    # Promotion needs evidence from the version's own run, not a tag: hand-made versions are refused.
    run_id = report["mlflow"]["run_id"]
    source = client.get_model_version("gated", "1").source
    model_id = source.removeprefix("models:/")
    cases = {
        "its run's report says the fp16 gate failed": dict(run_id=run_id, tags={"mlstep.gates": "failed",
                                                                                "mlstep.variant": "fp16"}),
        "does not name this version": dict(run_id=run_id, tags={"mlstep.gates": "passed", "mlstep.variant": "fp32"}),
        "is not an mlstep run": dict(run_id=register_source(mlflow_server, cancellation_model(tmp_path / "o.onnx"),
                                                            "other", alias=None)[1],
                                     tags={"mlstep.gates": "passed", "mlstep.variant": "fp32"}),
    }
    for why, kwargs in cases.items():
        forged = client.create_model_version("gated", source, model_id=model_id, **kwargs)
        refused = mlstep("promote", f"models:/gated/{forged.version}", "--alias", "champion", tracking=mlflow_server)
        line = one_line_error(refused, 1)
        assert why in line and "champion" in line, (why, line)
    untagged = mlstep("promote", "models:/other/1", "--alias", "champion", tracking=mlflow_server)
    assert "no mlstep.variant tag" in one_line_error(untagged, 1)
    assert client.get_model_version_by_alias("gated", "champion").version == "1"
    missing = mlstep("promote", "models:/gated/77", "--alias", "champion", tracking=mlflow_server)
    assert "not found" in one_line_error(missing, 2)


def test_no_secret_in_logs_params_tags_or_artifacts(mlflow_server, client, tiny_bert, tmp_path):
    """A password with a raw '@', ':' and '%' in the URI, a token in the environment: neither reaches any
    output, artifact, param, tag, the job summary, nor a debug traceback (MLSTEP_DEBUG=1)."""
    password, token = "pw-Zq8@s3:cr%et", "tok-Jx2Vv9secret"
    secret_uri = mlflow_server.replace("http://", "http://alice:" + password + "@")
    env = {"MLFLOW_TRACKING_TOKEN": token, "GITHUB_STEP_SUMMARY": str(tmp_path / "summary.md")}
    proc = mlstep("optimize", tiny_bert, "-o", tmp_path / "out", *QUICK, "-v", "--register-as", "secretive",
                  tracking=secret_uri, env=env)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    bad = mlstep("optimize", "models:/secretive/42", "-o", tmp_path / "bad", tracking=secret_uri, env=env)
    one_line_error(bad)
    debug = mlstep("optimize", "models:/secretive/42", "-o", tmp_path / "bad", tracking=secret_uri,
                   env=env | {"MLSTEP_DEBUG": "1"})
    with socket.socket() as sock:            # a port nobody listens on: requests' errors quote the URL
        sock.bind(("127.0.0.1", 0))
        dead_uri = f"http://alice:{password}@127.0.0.1:{sock.getsockname()[1]}"
    dead = mlstep("optimize", "models:/secretive/1", "-o", tmp_path / "bad", tracking=dead_uri,
                  env=env | {"MLSTEP_DEBUG": "1", "MLSTEP_REGISTRY_RETRIES": "0"})
    promote = mlstep("promote", "models:/secretive/1", "--alias", "x", tracking=dead_uri,
                     env=env | {"MLSTEP_DEBUG": "1", "MLSTEP_REGISTRY_RETRIES": "0"})
    assert debug.returncode == 2 and "Traceback" in debug.stderr, debug.stderr
    assert dead.returncode == 2 and "did not answer" in dead.stderr and promote.returncode == 2, dead.stderr

    texts = [proc.stdout, proc.stderr, bad.stdout, bad.stderr, (tmp_path / "summary.md").read_text()]
    texts += [p.stdout + p.stderr for p in (debug, dead, promote)]
    texts += [p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*.json")]
    texts += [p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*.md")]
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    run = client.get_run(report["mlflow"]["run_id"])
    texts += [json.dumps(run.data.params), json.dumps(run.data.tags), json.dumps(run.data.metrics)]
    dl = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, dst_path=str(tmp_path / "artifacts"),
                                                  tracking_uri=mlflow_server))
    for version in versions(client, "secretive").values():
        texts += [json.dumps(version.tags), version.description or "", version.source]
        model_dir = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/secretive/{version.version}",
                                                             dst_path=str(tmp_path / f"v{version.version}"),
                                                             tracking_uri=mlflow_server))
        texts += [p.read_text(errors="replace") for p in model_dir.rglob("*") if p.is_file() and p.suffix != ".onnx"]
    texts += [p.read_text(errors="replace") for p in dl.rglob("*") if p.is_file()]
    assert len(versions(client, "secretive")) == 2
    spellings = [password, "pw-Zq8%40s3", "s3:cr%", "cr%25et", token, "alice", "YWxpY2U6"]   # raw, encoded, Basic
    for text in texts:
        for secret in spellings:
            assert secret not in text, (secret, text[:2000])


def test_embedded_default_store(tmp_path, monkeypatch):
    """MLFLOW_TRACKING_URI unset: the step uses sqlite:///<cwd>/mlflow.db (artifacts in <cwd>/mlruns)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    register_source(store, cancellation_model(tmp_path / "m.onnx"), "embedded")
    proc = mlstep("optimize", "models:/embedded@candidate", "-o", tmp_path / "out", *QUICK, "-p", "fp32",
                  cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr + proc.stdout
    local = MlflowClient(store, store)
    found = versions(local, "embedded")
    assert sorted(found) == ["1", "2"] and found["2"].tags["mlstep.gates"] == "passed"
    assert str(local.get_model_version_by_alias("embedded", "optimized-fp32").version) == "2"
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["mlflow"]["tracking_uri"] == store
    run = local.get_run(report["mlflow"]["run_id"])
    assert run.info.artifact_uri.startswith((tmp_path / "mlruns").as_uri()) or str(tmp_path / "mlruns") in run.info.artifact_uri
    promoted = mlstep("promote", "models:/embedded/2", "--alias", "champion", cwd=tmp_path)
    assert promoted.returncode == 0, promoted.stderr
    assert str(local.get_model_version_by_alias("embedded", "champion").version) == "2"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("mlflow")) == ["mlflow.db"]


def test_usage_errors_touch_no_store(tmp_path):
    proc = mlstep("optimize", "models:/x/1", "-o", tmp_path / "o", "--alias-fp32", "latest", cwd=tmp_path)
    assert "invalid alias" in one_line_error(proc)
    proc = mlstep("optimize", "runs:/abc", "-o", tmp_path / "o", cwd=tmp_path)
    assert "runs:/RUN_ID/PATH" in one_line_error(proc)
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()

