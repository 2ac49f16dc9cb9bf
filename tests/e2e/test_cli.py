import json
import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from compress.checkpoint import load_model
from compress.data import load_source
from compress.exporting import onnx_predict
from compress.metrics import score

from ..conftest import REPO


@pytest.fixture
def applied(digits_model, write_recipe, run_cli, tmp_path):
    out = tmp_path / "out"
    result = run_cli("apply", "--recipe", write_recipe(), digits_model, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output + result.stderr
    return out, result


def test_apply_writes_verified_outputs_and_report(applied):
    out, result = applied
    assert sorted(p.name for p in out.iterdir()) == [".compress-output", "compression.json", "model.onnx", "model.pt", "model.safetensors",
                                                   "report.json", "report.md"]
    report = json.loads((out / "report.json").read_text())
    from dataclasses import fields

    from compress.report import Report

    assert list(report) == [f.name for f in fields(Report)]  # report.json's keys, in the documented order
    for side in ("original", "compressed"):
        for key in ("params", "macs", "onnx_bytes", "metric", "latency_ms"):
            assert key in report[side]
        assert set(report[side]["latency_ms"]) == {"1", "8"}
        assert {"p50", "p90", "p99"} <= set(report[side]["latency_ms"]["1"])
    assert report["compressed"]["macs"] < report["original"]["macs"]
    assert report["compressed"]["params"] < report["original"]["params"]
    assert report["parity"]["passed"] and {"max_abs_diff", "max_rel_diff"} <= set(report["parity"])
    assert {"recipe_sha256", "seed", "versions", "layers"} <= set(report)
    factorized = [row for row in report["layers"] if row["action"] == "factorize"]
    assert factorized and all({"name", "method", "rank", "params_before", "params_after", "macs_before",
                               "macs_after", "weight_shape"} <= set(row) for row in factorized)
    onnx.checker.check_model(str(out / "model.onnx"))
    assert "params" in result.output and "speedup" in result.output


def test_reported_accuracy_is_what_the_onnx_model_scores(applied):
    out, _ = applied
    report = json.loads((out / "report.json").read_text())
    test = load_source("bundled:digits/test")
    outputs = onnx_predict(out / "model.onnx", test, ["image"], 100)
    accuracy = score("accuracy", outputs, test.tensors["target"], None)
    assert report["compressed"]["metric"]["name"] == "accuracy"
    assert report["compressed"]["metric"]["value"] == pytest.approx(accuracy, abs=1e-6)
    assert report["compressed"]["onnx_metric"]["value"] == pytest.approx(accuracy, abs=1e-6)


def test_compressed_checkpoint_reloads_safely_and_matches_onnx(applied):
    out, _ = applied
    loaded = load_model(out / "model.pt")  # no --trust-checkpoint: factory + edits + weights
    x = load_source("bundled:digits/test").head(16)["image"]
    import onnxruntime as ort

    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(loaded.model(x).numpy(), got, atol=1e-4, rtol=1e-3)


def test_existing_output_is_refused_without_force(applied, digits_model, write_recipe, run_cli):
    out, _ = applied
    before = (out / "report.json").read_bytes()
    result = run_cli("apply", "-r", write_recipe(), digits_model, "--out", out, "-q")
    assert result.exit_code == 2 and "pass --force" in result.stderr
    assert (out / "report.json").read_bytes() == before
    result = run_cli("apply", "-r", write_recipe(), digits_model, "--out", out, "-q", "--force")
    assert result.exit_code == 0


def test_missed_gate_exits_3_after_writing_the_report(digits_model, write_recipe, run_cli, tmp_path):
    out = tmp_path / "gated"
    result = run_cli("apply", "-r", write_recipe(), digits_model, "--out", out, "-q", "--min-size-ratio", "100")
    assert result.exit_code == 3
    assert "min_size_ratio 100" in result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["gates"]["passed"] is False and report["gates"]["checked"][0]["gate"] == "min_size_ratio"


def test_parity_failure_exits_4_and_leaves_no_onnx(digits_model, write_recipe, run_cli, tmp_path):
    out = tmp_path / "strict"
    recipe = write_recipe(extra="export: {parity: {atol: 0.0, rtol: 0.0}}")
    result = run_cli("apply", "-r", recipe, digits_model, "--out", out, "-q")
    assert result.exit_code == 4, result.stderr
    assert "no ONNX model kept" in result.stderr
    assert not out.exists()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())


def test_untrusted_pickle_is_refused(tmp_path, write_recipe, run_cli):
    from compress.examples.digits import digits_resnet

    torch.save(digits_resnet(width=8), tmp_path / "whole.pt")
    result = run_cli("plan", "-r", write_recipe(), tmp_path / "whole.pt")
    assert result.exit_code == 2
    assert result.stderr.count("\n") == 1 and "--trust-checkpoint" in result.stderr
    result = run_cli("plan", "-r", write_recipe(), tmp_path / "whole.pt", "--trust-checkpoint")
    assert result.exit_code == 0 and "factorize" in result.output


def test_plan_lists_decisions_and_target_errors(digits_model, write_recipe, run_cli):
    result = run_cli("plan", "-r", write_recipe(), digits_model, "--json")
    rows = json.loads(result.stdout)
    assert {r["name"] for r in rows} == {f"layer{b}.{i}.conv{c}" for b in (1, 2) for i in (0, 1) for c in (1, 2)}
    bad = write_recipe("""\
        data: {eval: bundled:digits/test}
        stages:
          - method: svd
            targets: {include: ["layer3.*"]}
        """, name="bad.yaml")
    result = run_cli("plan", "-r", bad, digits_model)
    assert result.exit_code == 2
    assert "stages[0].targets.include[0]: pattern 'layer3.*' matches no layer" in result.stderr


def test_plan_keeps_layers_that_would_not_get_cheaper(digits_model, write_recipe, run_cli):
    recipe = write_recipe("""\
        data: {eval: bundled:digits/test}
        stages:
          - method: svd
            targets: {include: ["fc", "stem.0"]}
            energy: 1.0
        """)
    rows = json.loads(run_cli("plan", "-r", recipe, digits_model, "--json").stdout)
    assert [r["action"] for r in rows] == ["keep", "keep"]
    assert all("would not reduce MACs" in r["reason"] for r in rows)


def test_inspect_export_bench_and_schema(digits_model, run_cli, tmp_path):
    result = run_cli("inspect", digits_model, "--json")
    info = json.loads(result.stdout)
    conv = next(r for r in info["layers"] if r["name"] == "layer1.0.conv1")
    assert conv["rank_90"] <= conv["rank_95"] <= conv["rank_99"] <= conv["full_rank"] == 16
    assert conv["macs"] == 16 * 16 * 9 * 64
    onnx_path = tmp_path / "m.onnx"
    result = run_cli("export", digits_model, "--out", onnx_path)
    assert result.exit_code == 0 and onnx_path.is_file() and "passed" in result.output
    assert run_cli("export", digits_model, "--out", onnx_path).exit_code == 2
    result = run_cli("bench", onnx_path, "--batch-sizes", "1,4", "--runs", "3", "--warmup", "1", "--json", "-q")
    measured = json.loads(result.stdout)
    assert set(measured["latency_ms"][str(onnx_path)]) == {"1", "4"}
    assert measured["speedup"] == {} and measured["latency_ms"][str(onnx_path)]["4"]["runs"] == 3
    schema = json.loads(run_cli("recipe", "schema").stdout)
    assert "stages" in schema["properties"]


def test_example_refuses_to_overwrite(digits_model, run_cli):
    result = run_cli("example", "digits-resnet", digits_model)
    assert result.exit_code == 2 and "pass --force" in result.stderr


def test_python_dash_m_and_help_teach_by_example(run_cli):
    out = subprocess.run([sys.executable, "-m", "compress", "apply", "--help"], capture_output=True, text=True, check=True)
    assert "Example:" in out.stdout and "compress apply" in out.stdout
    for verb in ("apply", "plan", "inspect", "export", "bench", "example"):
        result = run_cli(verb, "--help")
        assert result.exit_code == 0 and "Example:" in result.output and "compress " + verb in result.output


def test_diverging_finetune_is_a_user_error(digits_model, write_recipe, run_cli, tmp_path):
    recipe = write_recipe(extra="", steps=30).read_text().replace("lr: 0.001", "lr: 1.0e+12")
    path = tmp_path / "diverge.yaml"
    path.write_text(recipe)
    result = run_cli("apply", "-r", path, digits_model, "--out", tmp_path / "d", "-q")
    assert result.exit_code == 2 and "diverged" in result.stderr
    assert not (tmp_path / "d").exists()


def test_readme_recipes_run_on_the_bundled_example(apply_shipped, digits_model):
    # every shipped recipe is documented (test_recipe_check plans each on its example) ...
    readme = (REPO / "README.md").read_text()
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert recipes and all(f"recipes/{r.name}" in readme or f"`{r.name}`" in readme for r in recipes)
    # ... and the README's main job runs (the other recipes run end to end in their methods' tests)
    _, report = apply_shipped("svd.yaml", digits_model)
    assert report["compressed"]["metric"]["name"] == "accuracy" and report["ratios"]["macs"] > 1.5
    assert report["parity"]["passed"] and report["finetune"]["steps"] > 0


def test_per_layer_ranks_override_the_rule(digits_model, write_recipe, run_cli):
    recipe = write_recipe("""\
        data: {eval: bundled:digits/test}
        stages:
          - method: svd
            targets: {types: [Conv2d], include: ["layer1.*"]}
            rank: 2
            ranks: {layer1.0.conv1: 3}
        """)
    rows = {r["name"]: r["rank"] for r in json.loads(run_cli("plan", "-r", recipe, digits_model, "--json").stdout)}
    assert rows["layer1.0.conv1"] == 3 and rows["layer1.0.conv2"] == 2
    bad = write_recipe("stages: [{method: svd, ranks: {nope: 3}}]\ndata: {eval: bundled:digits/test}\n", name="bad.yaml")
    result = run_cli("plan", "-r", bad, digits_model)
    assert result.exit_code == 2 and "stages[0].ranks.nope: no targeted layer has this name" in result.stderr


def test_artifact_reloads_from_factory_and_two_files(applied):
    import compress

    out, _ = applied
    description = json.loads((out / "compression.json").read_text())
    assert description["format"] == "compress.artifact" and description["version"] == 1
    assert description["factory"] == "compress.examples.digits:digits_resnet"
    assert {e["op"] for e in description["edits"]} == {"factorize"}
    (out / "model.pt").unlink()  # the artifact stands alone
    model = compress.load(out)
    x = load_source("bundled:digits/test").head(16)["image"]
    import onnxruntime as ort

    got = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"image": x.numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(model(x).numpy(), got, atol=1e-4, rtol=1e-3)
    assert torch.equal(compress.load(out / "compression.json")(x), model(x))
    report = json.loads((out / "report.json").read_text())
    assert {"model.safetensors", "compression.json", "model.onnx", "report.json"} <= set(report["files"])


def test_artifact_with_unknown_version_is_rejected(applied, run_cli, tmp_path):
    out, _ = applied
    description = json.loads((out / "compression.json").read_text())
    description["version"] = 7
    (out / "compression.json").write_text(json.dumps(description))
    result = run_cli("inspect", out)
    assert result.exit_code == 2
    assert "artifact format version 7 is not supported" in result.stderr


def test_progress_in_a_ci_log_is_lines_not_carriage_returns(digits_model, write_recipe, run_cli, tmp_path):
    result = run_cli("apply", "-r", write_recipe(steps=20), digits_model, "--out", tmp_path / "out")
    assert result.exit_code == 0, result.stderr
    lines = result.stderr.splitlines()
    assert "\r" not in result.stderr
    assert any(line.startswith("fine-tune: 10% (2/20 step)") for line in lines), result.stderr
    assert any(line.startswith("fine-tune: 100% (20/20 step)") for line in lines)
    assert sum(line.startswith("fine-tune:") for line in lines) <= 11  # about one line per tenth
    assert result.stdout.splitlines()[-1].startswith(f"wrote {tmp_path / 'out'}: ") and "compression.json" in result.stdout


def test_calibration_runs_once_per_apply(ctr_model, write_recipe, run_cli, tmp_path, monkeypatch):
    from compress.methods import afm

    calls = []
    real = afm.collect_moments
    monkeypatch.setattr(afm, "collect_moments", lambda *a, **k: calls.append(1) or real(*a, **k))
    recipe = write_recipe("""\
        data: {calibration: bundled:ctr/calibration, eval: bundled:ctr/test, batch_size: 256}
        inputs: [{name: fields, shape: [8], dtype: int64, dynamic_axes: {}}]
        stages: [{method: afm, targets: {include: ["mlp.0", "mlp.2"]}, energy: 0.95}]
        bench: {batch_sizes: [1], warmup: 1, runs: 3, baselines: []}
        """)
    assert run_cli("apply", "-r", recipe, ctr_model, "--out", tmp_path / "out", "-q").exit_code == 0
    assert len(calls) == 1  # the plan's statistics are the ones prepare uses
