"""MLflow 3 lineage, as MLflow means it to be used, against a real ``mlflow server``: each variant's
LoggedModel carries its own figures only (plain keys), options as params, the run's source tags, a
signature and an input example; the source is the run's input (a LoggedModel input) and points at its
variants; report.md is the run's description; in GitHub Actions the run and its models name the Actions run."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest

mlflow = pytest.importorskip("mlflow")
import mlflow.onnx  # noqa: E402
import onnx  # noqa: E402

from mlstep import registry  # noqa: E402

from registry_helpers import OPTIONS_HASH, tiny_model  # noqa: E402
from registry_helpers import client, files  # noqa: E402,F401  (fixtures)

GITHUB = {"GITHUB_ACTIONS": "true", "GITHUB_SERVER_URL": "https://github.example.com",
          "GITHUB_REPOSITORY": "acme/models", "GITHUB_RUN_ID": "777", "GITHUB_SHA": "c0ffee" * 6}
RUN_URL = "https://github.example.com/acme/models/actions/runs/777"
FIGURES = {"fp32": {"parity.max_abs_diff": 1.5e-6, "latency_ms.median": 2.0, "speedup": 1.3, "fusions.Attention": 2.0},
           "fp16": {"parity.max_abs_diff": 4.0e-3, "latency_ms.median": 1.0, "speedup": 2.6, "fusions.Attention": 2.0}}


def log_source(tracking: str, path: Path, name: str) -> tuple[str, str]:
    """The source as users log it in MLflow 3 (a LoggedModel, registered): (version, model_id)."""
    mlflow.set_tracking_uri(tracking)
    mlflow.set_registry_uri(tracking)
    with mlflow.start_run():
        info = mlflow.onnx.log_model(onnx.load(str(path)), name="model", registered_model_name=name,
                                     pip_requirements=["onnx"])
    return str(info.registered_model_version), info.model_id


def publish(store, source: str, name: str, files: dict[str, Path]):
    """publish + finish as the step calls them, with per-variant figures and a report.md."""
    with registry.materialize(source, store) as resolved:
        request = registry.PublishRequest(
            resolved=resolved, register_as=name, options_hash=OPTIONS_HASH,
            variants={v: registry.VariantToPublish(files[v], True, f"{v} variant", FIGURES[v]) for v in FIGURES},
            params={"options_hash": OPTIONS_HASH, "num_heads": "4"},
            metrics={f"{v}.{k}": x for v, figures in FIGURES.items() for k, x in figures.items()})
        pub = registry.publish(store, request)
        record = registry.record(store, resolved, name, pub)
        with tempfile.TemporaryDirectory() as tmp:
            md = Path(tmp) / "report.md"
            md.write_text(f"# mlstep optimize\n\n- source: `{source}`\n- run status: {pub.run_status}\n")
            report = Path(tmp) / "report.json"
            report.write_text(json.dumps({"mlflow": record}))
            pub = registry.finish(store, pub, [report, md], {}, True)
            return pub, record, md.read_text()


@pytest.fixture(scope="module")
def lineage(mlflow_server, tmp_path_factory):
    """One step's publication in a GitHub Actions environment (the tests below read what it left)."""
    root = tmp_path_factory.mktemp("lineage")
    files = {v: tiny_model(root / v / "model.onnx", seed) for seed, v in enumerate(("source", "fp32", "fp16"), 11)}
    with pytest.MonkeyPatch.context() as env:
        for key, value in GITHUB.items():
            env.setenv(key, value)
        name = "lineage"
        version, source_model_id = log_source(mlflow_server, files["source"], name)
        pub, record, note = publish(registry.Store(mlflow_server), f"models:/{name}/{version}", name, files)
    assert pub.error is None, pub.error
    return name, version, source_model_id, pub, record, note


def test_each_logged_model_carries_its_own_figures_with_plain_keys(lineage, client):
    name, _, _, pub, _, _ = lineage
    for variant, figures in FIGURES.items():
        reg = pub.registrations[variant]
        version = client.get_model_version(name, reg.version)
        logged = client.get_logged_model(registry.model_id_of_version(version))
        got = {m.key: m.value for m in logged.metrics}
        assert got == pytest.approx(figures), (variant, got)          # the other variant's figures absent
        assert logged.params["num_heads"] == "4" and logged.source_run_id == pub.run_id
    run = client.get_run(pub.run_id)
    assert run.data.metrics["fp32.speedup"] == 1.3 and run.data.metrics["fp16.speedup"] == 2.6


def test_source_is_the_runs_input_and_points_at_its_variants(lineage, client):
    name, version, source_model_id, pub, record, _ = lineage
    run = client.get_run(pub.run_id)
    assert [m.model_id for m in run.inputs.model_inputs] == [source_model_id]
    assert record["source"]["model_id"] == source_model_id
    tags = client.get_model_version(name, version).tags
    assert tags["mlstep.optimized.fp32"] == pub.registrations["fp32"].uri
    assert tags["mlstep.optimized.fp16"] == pub.registrations["fp16"].uri
    assert client.get_logged_model(source_model_id).tags["mlstep.optimized.fp16"] == pub.registrations["fp16"].uri


def test_every_variant_has_a_signature_and_an_input_example(lineage, mlflow_server, tmp_path):
    from mlflow.artifacts import download_artifacts
    from mlflow.models import Model

    _, _, _, pub, _, _ = lineage
    for variant in FIGURES:
        folder = download_artifacts(pub.registrations[variant].uri, dst_path=str(tmp_path / variant),
                                    tracking_uri=mlflow_server)
        model = Model.load(folder)
        assert model.signature is not None and model.signature.inputs.input_names() == ["x"]
        example = model.load_input_example(folder)
        assert example["x"].shape == (2, 4) and str(example["x"].dtype) == "float32"


def test_report_is_the_run_description_and_the_actions_run_is_the_source(lineage, client):
    name, _, _, pub, _, note = lineage
    run = client.get_run(pub.run_id)
    assert run.data.tags["mlflow.note.content"] == note
    assert run.data.tags["mlflow.source.type"] == "JOB" and run.data.tags["mlflow.source.name"] == RUN_URL
    assert run.data.tags["github.run_url"] == RUN_URL
    for variant in FIGURES:
        version = client.get_model_version(name, pub.registrations[variant].version)
        logged = client.get_logged_model(registry.model_id_of_version(version))
        keys = ("mlflow.source.type", "mlflow.source.name", "mlflow.source.git.commit")
        assert {k: logged.tags.get(k) for k in keys} == {k: run.data.tags[k] for k in keys}


def test_logged_model_and_run_sources_resolve_to_the_source_model_id(mlflow_server, client, files, tmp_path):
    name = f"lineage-m-{tmp_path.name}"
    _, model_id = log_source(mlflow_server, files["source"], name)
    store = registry.Store(mlflow_server)
    with registry.materialize(f"models:/{model_id}", store) as resolved:
        assert resolved.model_id == model_id
    run_id = client.get_logged_model(model_id).source_run_id
    with registry.materialize(f"runs:/{run_id}/model", store) as resolved:
        assert resolved.model_id == model_id and resolved.kind == "run"


def test_a_long_report_is_cut_at_mlflows_limit_and_says_where_the_rest_is(tmp_path):
    md = tmp_path / "report.md"
    md.write_text("# mlstep optimize\n" + "".join(f"- line {i}\n" for i in range(2000)))
    text = registry.description(md)
    assert len(text) <= 8000 and text.endswith("the full report is the run's artifact report.md)\n")
