"""Models as third-party libraries ship them: probability outputs, dict outputs, embeddings."""
import json

import pytest
import torch

from compress.checkpoint import load_model
from compress.data import load_source
from compress.exporting import onnx_predict

from ..tiny_models import ClickProbability, DictEncoder, digits_as_tokens

CTR = """\
data: {{train: bundled:ctr/train, calibration: bundled:ctr/calibration, eval: bundled:ctr/test, batch_size: 256}}
inputs: [{{name: fields, shape: [8], dtype: int64, dynamic_axes: {{}}}}]
stages:
  - {{method: afm, targets: {{include: ["base.embeddings.*"]}}, rank: 4}}
  - {{method: afm, targets: {{include: ["base.mlp.0", "base.mlp.2"]}}, energy: 0.95}}
finetune: {{epochs: {epochs}, lr: 0.001}}
bench: {{batch_sizes: [1], warmup: 1, runs: 3, baselines: []}}
"""


def test_a_probability_model_fine_tuned_with_labels(ctr_model, write_recipe, run_cli, tmp_path):
    torch.save(ClickProbability(load_model(ctr_model).model), tmp_path / "prob.pt")
    reports = {}
    for epochs in (0, 1):
        out = tmp_path / f"ft{epochs}"
        result = run_cli("apply", "-r", write_recipe(CTR.format(epochs=epochs), name=f"r{epochs}.yaml"),
                         tmp_path / "prob.pt", "--out", out, "-q", "--trust-checkpoint")
        assert result.exit_code == 0, result.stderr
        reports[epochs] = json.loads((out / "report.json").read_text())
    report = reports[1]
    assert report["output"]["kind"] == "probabilities" and "Sigmoid" in report["output"]["reason"]
    assert report["finetune"]["loss_terms"]["task"] > 0
    c = report["compressed"]
    assert c["metric"]["name"] == "auc" and abs(c["metric"]["value"] - c["onnx_metric"]["value"]) <= 1e-3
    # the loss no longer drives negatives to exactly 0: the outputs stay distinct, so no ranking ties
    test = load_source("bundled:ctr/test")
    outputs = onnx_predict(tmp_path / "ft1" / "model.onnx", test, ["fields"], 1024)
    assert 0 < float(outputs.min()) and float(outputs.max()) < 1
    assert torch.unique(outputs).numel() >= 0.95 * len(test)
    # fine-tuning with labels does not hurt the AUC the compression kept
    assert c["metric"]["value"] >= reports[0]["compressed"]["metric"]["value"] - 0.002


def test_dict_outputs_with_an_output_key_and_embedding_metrics(write_recipe, run_cli, tmp_path):
    torch.manual_seed(0)
    torch.save(DictEncoder(), tmp_path / "encoder.pt")
    torch.save({k: v for k, v in digits_as_tokens("calibration").items() if k != "target"}, tmp_path / "tokens.pt")
    for metric in ("cosine", "neighbors"):
        recipe = write_recipe(f"""\
            model: {{output_key: embedding}}
            data: {{train: tokens.pt, eval: tokens.pt, metric: {metric}}}
            stages: [{{method: svd, targets: {{include: ["block.*"]}}, rank: 4}}]
            finetune: {{steps: 4, distill: {{weight: 1.0, loss: cosine}}}}
            bench: {{batch_sizes: [1], warmup: 1, runs: 3, baselines: []}}
            """, name=f"{metric}.yaml")
        out = tmp_path / metric
        result = run_cli("apply", "-r", recipe, tmp_path / "encoder.pt", "--out", out, "-q", "--trust-checkpoint")
        assert result.exit_code == 0, result.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["original"]["metric"] == {"name": metric, "value": 1.0}
        assert 0.0 < report["compressed"]["metric"]["value"] < 1.0
        assert report["finetune"]["loss_terms"]["distill"] > 0
        import onnx

        output = onnx.load(str(out / "model.onnx")).graph.output[0]
        assert [d.dim_param or d.dim_value for d in output.type.tensor_type.shape.dim] == ["batch", 32]  # the embedding
    bad = write_recipe("model: {output_key: pooled}\ndata: {eval: tokens.pt}\nstages: [{method: svd, rank: 4}]\n",
                       name="bad.yaml")
    result = run_cli("plan", "-r", bad, tmp_path / "encoder.pt", "--trust-checkpoint")
    assert result.exit_code == 2 and "output_key 'pooled' is not in the model's dict output" in result.stderr


@pytest.mark.parametrize("kind", ["logits", "probabilities"])
def test_single_output_distillation_is_not_silently_zero(kind, write_recipe, run_cli, tmp_path, ctr_model):
    model = load_model(ctr_model).model
    torch.save(model if kind == "logits" else ClickProbability(model), tmp_path / "m.pt")
    recipe = write_recipe("""\
        data: {train: bundled:ctr/calibration, eval: bundled:ctr/test, target: none, batch_size: 256}
        inputs: [{name: fields, shape: [8], dtype: int64, dynamic_axes: {}}]
        stages: [{method: svd, targets: {include: ["mlp.0", "base.mlp.0"], types: [Linear]}, rank: 2}]
        finetune: {steps: 3, distill: {weight: 1.0, loss: kl}}
        bench: {batch_sizes: [1], warmup: 1, runs: 3, baselines: []}
        """.replace('include: ["mlp.0", "base.mlp.0"]', 'include: ["mlp.0"]' if kind == "logits" else 'include: ["base.mlp.0"]'))
    out = tmp_path / "out"
    result = run_cli("apply", "-r", recipe, tmp_path / "m.pt", "--out", out, "-q", "--trust-checkpoint")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["output"]["kind"] == kind and report["finetune"]["loss_terms"]["distill"] > 0


def test_an_output_key_for_a_tensor_output_is_an_error_not_ignored(write_recipe, run_cli, digits_model, tmp_path):
    recipe = write_recipe(extra="model: {output_key: logits}")
    result = run_cli("plan", "-r", recipe, digits_model)
    assert result.exit_code == 2 and "returns a single tensor, which has no keys" in result.stderr, result.stderr
    assert result.stderr.count("\n") == 1
