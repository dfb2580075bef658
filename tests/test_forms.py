"""Form selection (mlstep.forms): real tiny exports, real ONNX Runtime sessions, a real MLflow server.

Speed is never asserted here (benchmarks/cpu_latency.py carries the numbers): the tests check what is built,
that a form failing parity is never chosen (not even timed), that a less fused form is chosen only when
confidently faster than the fused one (paired rounds, 95% interval), and that the choice and its evidence reach
report.json, report.md and the MLflow run.
"""
from __future__ import annotations

import json
import math

import numpy as np
import onnx_ir as ir
import pytest

from mlstep import forms, step
from mlstep.export import ExportSpec
from mlstep.optimizer import OptimizeOptions, io, optimize
from mlstep.validate.parity import parity_cases

CPU = ["CPUExecutionProvider"]
QUICK_SELECT = forms.SelectSettings(min_rounds=3, max_rounds=5, budget_s=1.0)


@pytest.fixture(scope="module")
def bert(exported):
    return exported(ExportSpec("bert"))


@pytest.fixture(scope="module")
def bert_candidates(bert, tmp_path_factory):
    fused = optimize(io.load(bert), OptimizeOptions(), source_dir=bert.parent)
    return forms.build_candidates(fused.model, bert, OptimizeOptions(), tmp_path_factory.mktemp("forms"))


def ms_ops(path) -> dict[str, int]:
    model = io.load(path)
    counts: dict[str, int] = {}
    for node in model.graph:
        if node.domain == "com.microsoft":
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


def test_each_distinct_form_is_built(bert_candidates):
    by_name = {c.name: c for c in bert_candidates}
    assert list(by_name) == [forms.FUSED, forms.ATTENTION_UNFUSED, forms.UNFUSED]
    assert ms_ops(by_name[forms.FUSED].path).get("Attention") == 2
    unfused_attention = ms_ops(by_name[forms.ATTENTION_UNFUSED].path)
    assert "Attention" not in unfused_attention and "MultiHeadAttention" not in unfused_attention
    assert unfused_attention.get("SkipLayerNormalization") and unfused_attention.get("EmbedLayerNormalization")
    assert ms_ops(by_name[forms.UNFUSED].path) == {}
    assert by_name[forms.ATTENTION_UNFUSED].disabled_fusions == ("attention",)


def test_a_form_equal_to_the_fused_one_is_not_built(bert, tmp_path):
    # Near-miss: attention already disabled by the user -> "attention-unfused" would be the fused form again.
    options = OptimizeOptions(disabled_fusions=frozenset({"attention"}))
    fused = optimize(io.load(bert), options, source_dir=bert.parent)
    names = [c.name for c in forms.build_candidates(fused.model, bert, options, tmp_path)]
    assert names == [forms.FUSED, forms.UNFUSED]


def broken_copy(candidate: forms.Candidate, directory) -> forms.Candidate:
    """The same graph with one weight scaled: as fast as the original, numerically wrong."""
    model = io.load(candidate.path)
    name, value = max(((n, v) for n, v in model.graph.initializers.items() if v.const_value is not None
                       and v.const_value.dtype == ir.DataType.FLOAT), key=lambda item: item[1].const_value.size)
    value.const_value = ir.tensor(value.const_value.numpy() * 1.5 + 0.1, name=name)
    return forms.Candidate("broken", io.save(model, directory / "broken" / "model.onnx"), candidate.fusions, ())


def test_a_form_failing_parity_is_never_chosen_and_the_choice_is_the_fastest_passing(bert, bert_candidates,
                                                                                      tmp_path):
    broken = broken_copy(bert_candidates[-1], tmp_path)
    candidates = [broken, *bert_candidates]              # first in line: it would win ties
    cases = parity_cases(io.load(bert), batch=2, sequence=8)
    settings = forms.SelectSettings(shapes=((2, 8), (3, 16)), min_rounds=3, max_rounds=5, budget_s=1.0)
    sel = forms.select(bert, candidates, cases, CPU, settings)
    assert sel.parity["broken"].passed is False
    assert all(sel.parity[c.name].passed for c in bert_candidates)
    assert sel.chosen != "broken" and "broken" not in sel.timings      # not eligible, not even timed
    assert "failed parity, not eligible: broken" in sel.reason
    assert set(sel.timings[forms.FUSED]) == {"2x8", "3x16"}
    passing = [c.name for c in bert_candidates]
    assert sel.chosen in passing and sel.measured
    assert sel.chosen == forms.choose([c.name for c in candidates], sel.parity, sel.timings)[0]
    if sel.chosen != forms.FUSED:            # a less fused form only when confidently faster
        assert forms.ratio_to(sel.timings, sel.chosen, forms.FUSED).high < 1.0
    record = sel.as_dict()
    assert record["session"]["graph_optimization_level"] == "ORT_ENABLE_ALL"
    assert record["session"]["intra_op_threads"] >= 1 and record["provider"] == "CPUExecutionProvider"
    assert [c["name"] for c in record["candidates"] if c["chosen"]] == [sel.chosen]
    assert record["candidates"][0]["parity"]["passed"] is False and record["candidates"][0]["median_ms"] == {}
    json.dumps(record, allow_nan=False)


def test_choose_rule():
    class P:
        def __init__(self, passed):
            self.passed = passed

    def t(*samples):          # per-round means, paired by round across forms
        return forms.Timing(float(np.median(samples)), len(samples), 1, tuple(samples))

    names = [forms.FUSED, forms.ATTENTION_UNFUSED, forms.UNFUSED]
    noise = (1.0, 1.04, 0.97, 1.02, 0.99, 1.03)        # the machine's load, shared by a round's calls
    timings = {forms.FUSED: {"2x8": t(*(10 * x for x in noise)), "2x64": t(*(40 * x for x in noise))},
               forms.ATTENTION_UNFUSED: {"2x8": t(*(8 * x for x in noise)), "2x64": t(*(35 * x for x in noise))},
               forms.UNFUSED: {"2x8": t(*(9 * x for x in noise)), "2x64": t(*(60 * x for x in noise))}}
    ok = {n: P(True) for n in names}
    # attention-unfused is faster in every round (0.8 and 0.875): confidently faster; unfused is not (0.9, 1.5)
    chosen, why = forms.choose(names, ok, timings)
    assert chosen == forms.ATTENTION_UNFUSED and "confidently faster" in why and "95% interval" in why
    est = forms.ratio_to(timings, forms.ATTENTION_UNFUSED, forms.FUSED)
    assert est.high < 1.0 and est.blocks == 12
    assert forms.choose(names, {**ok, forms.ATTENTION_UNFUSED: P(False)}, timings)[0] == forms.FUSED
    assert forms.choose(names, {n: P(False) for n in names}, timings)[0] == forms.FUSED
    # 3% faster by the medians but not in every round: within noise, the more fused form stays
    jitter = {forms.FUSED: {"2x8": t(10.0, 10.5, 9.6, 10.2, 9.9, 10.4)},
              forms.UNFUSED: {"2x8": t(9.5, 10.6, 9.1, 10.3, 9.2, 10.1)}}
    assert forms.ratio_to(jitter, forms.UNFUSED, forms.FUSED).ratio < 1.0
    chosen, why = forms.choose(names, ok, jitter)
    assert chosen == forms.FUSED and "no less fused form is confidently faster" in why
    tie = {n: {"2x8": forms.Timing(5.0, 5, 1)} for n in names}
    assert forms.choose(names, ok, tie)[0] == forms.FUSED                   # ties go to the more fused form
    assert forms.choose(names, ok, {})[0] == forms.FUSED                    # nothing measured


def run_step(source, out, **settings):
    base = dict(precisions=("fp32",), warmup=1, repeat=6, remeasure=0, max_slowdown=10.0)
    return step.run(source, out, OptimizeOptions(), step.StepSettings(**{**base, **settings}),
                    publish=step.PublishSettings(register=False))


@pytest.fixture(scope="module")
def measured_step(bert, mlflow_server, tmp_path_factory):
    """One step with the forms measured, registered on the session server: (result, output folder). Its report
    and its MLflow run are read by the two tests below (one measured step, not one each)."""
    out = tmp_path_factory.mktemp("measured") / "out"
    settings = step.StepSettings(precisions=("fp32",), warmup=1, repeat=6, remeasure=0, max_slowdown=10.0)
    with pytest.MonkeyPatch.context() as patch:
        for key in [k for k in list(__import__("os").environ) if k.startswith("MLFLOW_")]:
            patch.delenv(key)
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        result = step.run(bert, out, OptimizeOptions(), settings,
                          publish=step.PublishSettings(register_as="forms-evidence"))
    return result, out


def test_step_writes_the_chosen_form_and_records_the_evidence(measured_step):
    result, out = measured_step
    record = result.report["forms"]
    assert record["measured"] and record["shapes"] == ["2x8"]
    chosen = next(c for c in record["candidates"] if c["chosen"])
    assert chosen["name"] == record["chosen"] and chosen["parity"]["passed"]
    fastest = min((c for c in record["candidates"] if c["parity"]["passed"]),
                  key=lambda c: c["relative_to_fused"])
    assert math.isclose(chosen["relative_to_fused"], fastest["relative_to_fused"])
    assert result.report["variants"]["fp32"]["fusions"] == chosen["fusions"]      # the written variant is it
    assert ms_ops(out / "fp32" / "model.onnx") == {
        op: n for op, n in chosen["fusions"].items() if op != "LayerNormalization"}
    assert not (out / ".forms").exists()                                           # candidates not left behind
    markdown = (out / "report.md").read_text()
    assert "## Form" in markdown and "ORT_ENABLE_ALL" in markdown and f"**{record['chosen']}**" in markdown
    params, metrics = forms.mlflow_fields(record)
    assert params["forms.chosen"] == record["chosen"] and params["forms.session_level"] == "ORT_ENABLE_ALL"
    assert metrics[f"forms.{forms.FUSED}.median_ms.2x8"] > 0


def test_forced_form_and_selection_off(bert, tmp_path):
    forced = run_step(bert, tmp_path / "forced", form=forms.ATTENTION_UNFUSED, benchmark=False)
    fp32 = forced.report["variants"]["fp32"]
    assert "Attention" not in fp32["fusions"] and fp32["fusions"].get("SkipLayerNormalization")
    assert fp32["parity"]["passed"] and forced.report["forms"]["chosen"] == forms.ATTENTION_UNFUSED
    assert forced.report["coverage"]["state"] == "passed"     # coverage: what the optimizer can fuse
    assert forced.passed
    off = run_step(bert, tmp_path / "off", benchmark=False)
    assert off.report["forms"]["chosen"] == forms.FUSED and not off.report["forms"]["measured"]
    assert "--skip-benchmark" in off.report["forms"]["reason"]
    assert off.report["variants"]["fp32"]["fusions"]["Attention"] == 2
    # the registry's key: a forced form is another result; auto keeps the key it had before forms existed
    assert forced.report["options"]["options_hash"] != off.report["options"]["options_hash"]
    assert off.report["options"]["options_hash"] == OptimizeOptions().hash()
    with pytest.raises(Exception, match="unknown form"):
        run_step(bert, tmp_path / "bad", form="mha-packed")


def test_gpt2_with_past_forms(exported_gpt2, tmp_path):
    source = exported_gpt2("lm", "dynamo", 18, "sdpa", True)
    fused = optimize(io.load(source), OptimizeOptions(), source_dir=source.parent)
    candidates = forms.build_candidates(fused.model, source, OptimizeOptions(), tmp_path)
    assert [c.name for c in candidates] == [forms.FUSED, forms.ATTENTION_UNFUSED, forms.UNFUSED]
    assert candidates[0].fusions.get("MultiHeadAttention") == 2
    cases = parity_cases(io.load(source), batch=2, sequence=8)
    assert any(c.name.startswith("past17") for c in cases)
    sel = forms.select(source, candidates, cases, CPU, QUICK_SELECT)
    assert all(r.passed for r in sel.parity.values())
    assert set(sel.timings[sel.chosen]) == {"2xpast8"}


def test_choice_reaches_the_mlflow_run(measured_step, mlflow_server):
    from mlflow import MlflowClient

    result, _ = measured_step
    run = MlflowClient(mlflow_server).get_run(result.report["mlflow"]["run_id"])
    assert run.data.params["forms.chosen"] == result.report["forms"]["chosen"]
    assert run.data.params["forms.candidates"] == "fused,attention-unfused,unfused"
    assert run.data.metrics["forms.fused.median_ms.2x8"] > 0
    assert np.isclose(run.data.metrics["forms.fused.relative_to_fused"], 1.0)
