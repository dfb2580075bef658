"""``mlstep benchmark`` logs to a real ``mlflow server``: for an MLflow source always, for a local file with
``--log-to-mlflow``; the run holds the grid's params, metrics and files, and the source as its input."""
from __future__ import annotations

import pytest

mlflow = pytest.importorskip("mlflow")
from mlflow import MlflowClient  # noqa: E402

from mlstep.export import ExportSpec  # noqa: E402
from test_registry import mlstep, register_source  # noqa: E402

QUICK = ["-s", "4", "-p", "fp32", "--warmup", "1", "--repeat", "2"]


def benchmark_runs(client: MlflowClient) -> dict[str, object]:
    exp = client.get_experiment_by_name("mlstep")
    runs = client.search_runs([exp.experiment_id], "tags.`mlstep.kind` = 'benchmark'") if exp else []
    return {r.info.run_id: r for r in runs}


def logged_run(proc, client: MlflowClient):
    assert proc.returncode == 0, proc.stderr + proc.stdout
    line = next(line for line in proc.stdout.splitlines() if line.startswith("mlflow: run "))
    run = client.get_run(line.split()[2])
    assert run.info.status == "FINISHED" and run.data.tags["mlstep.kind"] == "benchmark"
    return run


def test_an_mlflow_source_is_logged_with_the_source_as_the_runs_input(mlflow_server, exported, tmp_path):
    client = MlflowClient(mlflow_server, mlflow_server)
    version, run_id = register_source(mlflow_server, exported(ExportSpec("bert")), "bench-bert", alias="candidate")
    source_model = client.get_model_version("bench-bert", version).source.split("/", 1)[1]
    actions = {"GITHUB_REPOSITORY": "acme/models", "GITHUB_RUN_ID": "9", "GITHUB_SERVER_URL": "https://github.com"}
    proc = mlstep("benchmark", "models:/bench-bert@candidate", *QUICK, tracking=mlflow_server, env=actions)
    run = logged_run(proc, client)
    assert run.data.tags["mlstep.source"] == f"models:/bench-bert/{version}"
    assert run.data.tags["mlflow.source.name"] == "https://github.com/acme/models/actions/runs/9"
    assert [m.model_id for m in run.inputs.model_inputs] == [source_model]
    assert run.data.params["precisions"] == "fp32" and run.data.params["sequence_lengths"] == "4"
    assert run.data.metrics["latency_ms.onnxruntime_mlstep.fp32.b1.s4"] > 0
    assert run.data.metrics["latency_ms.onnxruntime_source.fp32.b1.s4"] > 0


def test_a_local_file_with_log_to_mlflow_logs_the_grid_and_its_files(mlflow_server, exported, tmp_path):
    client = MlflowClient(mlflow_server, mlflow_server)
    model = exported(ExportSpec("bert"))
    proc = mlstep("benchmark", model, *QUICK, "--log-to-mlflow", "-o", tmp_path / "bench", tracking=mlflow_server)
    run = logged_run(proc, client)
    assert run.data.tags["mlstep.source"].startswith(model.resolve().as_uri() + "#sha256=")
    assert run.inputs.model_inputs == []
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"benchmark.md", "benchmark.csv", "benchmark.json"} <= names


def test_a_dead_store_fails_before_timing_and_logs_nothing(mlflow_server, exported, tmp_path):
    client = MlflowClient(mlflow_server, mlflow_server)
    before = set(benchmark_runs(client))
    proc = mlstep("benchmark", exported(ExportSpec("bert")), *QUICK, "--log-to-mlflow", "-o", tmp_path / "bench",
                  tracking="http://127.0.0.1:9")
    assert proc.returncode == 2 and len(proc.stderr.splitlines()) == 1, proc.stderr
    assert "did not answer" in proc.stderr and not (tmp_path / "bench").exists()
    assert set(benchmark_runs(client)) == before
