"""A step that died on another host leaves its run RUNNING: the next step of the same key ends it KILLED (with
a tag saying which run ended it and why) once it is older than MLSTEP_STALE_RUN_HOURS, and leaves a younger
one alone (a live concurrent step). The run's age is set through MLflow's own ``start_time``: no waiting.
report.md says the run's status, the duplicates removed and the stale runs ended."""
from __future__ import annotations

import time

import pytest

pytest.importorskip("mlflow")

from mlstep import gates, registry, report
from mlstep.errors import BadInputError
from mlstep.registry.publish import TAG_HOST, TAG_PID

from registry_helpers import OPTIONS_HASH, step_publish
from registry_helpers import client, files  # noqa: F401  (fixtures)

HOUR_MS = 3600 * 1000


def left_running(client, key: str, host: str, hours_ago: float) -> str:
    """A run as a step on ``host`` leaves it when its machine dies: RUNNING, started ``hours_ago``."""
    exp = client.get_experiment_by_name(registry.DEFAULT_EXPERIMENT)
    exp_id = exp.experiment_id if exp else client.create_experiment(registry.DEFAULT_EXPERIMENT)
    run = client.create_run(exp_id, start_time=int(time.time() * 1000 - hours_ago * HOUR_MS),
                            tags={registry.TAG_KEY: key, TAG_HOST: host, TAG_PID: "4242"})
    return run.info.run_id


def test_a_stale_run_of_another_host_is_ended_and_a_young_one_is_left(mlflow_server, client, files, tmp_path,
                                                                      monkeypatch):
    monkeypatch.setenv("MLSTEP_STALE_RUN_HOURS", "6")
    key = registry.idempotency_key(registry.source_digest(files["source"]), OPTIONS_HASH)
    stale = left_running(client, key, "runner-7", hours_ago=7)
    young = left_running(client, key, "runner-8", hours_ago=5)
    name = f"stale-{tmp_path.name}"
    pub = step_publish(registry.Store(mlflow_server), str(files["source"]), name,
                       {"fp32": files["fp32"], "fp16": files["fp16"]})
    assert pub.error is None and pub.run_status == "FINISHED", pub.error
    assert pub.reaped == [stale]
    ended = client.get_run(stale)
    assert ended.info.status == "KILLED"
    note = ended.data.tags["mlstep.ended_by"]
    assert pub.run_id in note and "runner-7" in note and "MLSTEP_STALE_RUN_HOURS" in note, note
    assert client.get_run(young).info.status == "RUNNING"
    client.set_terminated(young, "FINISHED")          # leave the shared server tidy for the other tests


def test_a_malformed_stale_bound_fails_before_any_request(mlflow_server, files, tmp_path, monkeypatch):
    monkeypatch.setenv("MLSTEP_STALE_RUN_HOURS", "soon")
    with pytest.raises(BadInputError, match="MLSTEP_STALE_RUN_HOURS"):
        step_publish(registry.Store(mlflow_server), str(files["source"]), f"bad-{tmp_path.name}",
                     {"fp32": files["fp32"]})


def test_report_md_states_run_status_removed_duplicates_and_ended_runs(tmp_path):
    facts = report.RunFacts(
        source="models:/m/1", model_type="bert", num_heads=4, hidden_size=32, options={}, optimizer_seconds=0.1,
        variants={"fp32": report.VariantFacts(path="fp32/model.onnx", registered="models:/m/2")},
        mlflow={"tracking_uri": "http://127.0.0.1:5000", "run_id": "abc", "experiment_id": "1",
                "run_status": "FINISHED", "registered_model": "m",
                "registrations": {"fp32": {"status": "registered", "uri": "models:/m/2", "alias": None}},
                "removed_duplicates": ["models:/m/3"], "ended_stale_runs": ["def"], "error": None})
    coverage = gates.coverage_verdict(None)
    text = report.render_markdown(report.build(facts, {"fp32": gates.decide(None, None, coverage)}, coverage))
    assert "- run: `abc` (experiment 1, FINISHED)" in text
    assert "removed duplicate versions (made by retried or concurrent registrations): `models:/m/3`" in text
    assert "ended runs that a dead mlstep step left RUNNING: `def`" in text
