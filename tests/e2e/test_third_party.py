"""A model from another library: two integer inputs, Linear layers on 3-D activations, pickled."""
import json

import torch

from ..tiny_models import digits_as_tokens, token_classifier


def test_pickled_transformer_with_token_ids_and_mask(tmp_path, write_recipe, run_cli):
    torch.manual_seed(0)
    model = token_classifier()
    torch.save(model, tmp_path / "encoder.pt")
    torch.save(digits_as_tokens("train"), tmp_path / "train.pt")
    torch.save(digits_as_tokens("test"), tmp_path / "test.pt")
    recipe = write_recipe("""\
        data: {train: train.pt, eval: test.pt, batch_size: 32}
        stages:
          - method: svd
            targets: {types: [Linear], exclude: [head]}
            rank: 4
        finetune: {steps: 3}
        bench: {batch_sizes: [1, 4], warmup: 1, runs: 2}
        """)
    out = tmp_path / "out"
    refused = run_cli("apply", "-r", recipe, tmp_path / "encoder.pt", "--out", out, "-q")
    assert refused.exit_code == 2 and "--trust-checkpoint" in refused.stderr
    result = run_cli("apply", "-r", recipe, tmp_path / "encoder.pt", "--out", out, "-q", "--trust-checkpoint")
    assert result.exit_code == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    actions = {row["name"]: row for row in report["layers"]}
    for name in ("query", "key", "value", "output", "up", "down"):
        assert actions[f"block.{name}"]["action"] == "factorize"
    # torch's own layers read these weights directly (fast paths): replacing them would break the model
    for name in ("encoder.self_attn.out_proj", "encoder.linear1", "encoder.linear2"):
        assert actions[name]["action"] == "keep" and "read directly" in actions[name]["reason"]
    assert report["inputs"] == ["tokens", "mask"]
    assert report["parity"]["passed"]
    import onnx

    graph = onnx.load(str(out / "model.onnx")).graph
    dims = [d.dim_param or d.dim_value for d in graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "sequence"]


def test_unlabeled_data_distills_and_reports_cosine_or_agreement(tmp_path, digits_model, write_recipe, run_cli):
    from compress.examples.digits import digits_split

    images = {"image": digits_split("calibration")["image"]}
    torch.save(images, tmp_path / "unlabeled.pt")
    recipe = write_recipe("""\
        data: {train: unlabeled.pt, eval: unlabeled.pt}
        stages: [{method: svd, targets: {types: [Conv2d], include: ["layer2.*"]}, ratio: 0.5}]
        finetune: {steps: 3}
        bench: {batch_sizes: [1], warmup: 1, runs: 2}
        """)
    result = run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 0, result.stderr
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    # without labels, auto never scores by top-1 agreement (it means nothing for an embedding): cosine
    assert report["original"]["metric"] == {"name": "cosine", "value": 1.0}
    assert report["compressed"]["metric"]["name"] == "cosine" and 0.5 < report["compressed"]["metric"]["value"] < 1.0
    assert report["finetune"]["steps"] == 3
    recipe.write_text(recipe.read_text().replace("data: {train: unlabeled.pt, eval: unlabeled.pt}",
                                                 "data: {train: unlabeled.pt, eval: unlabeled.pt, metric: agreement}"))
    result = run_cli("apply", "-r", recipe, digits_model, "--out", tmp_path / "out2", "-q")
    report = json.loads((tmp_path / "out2" / "report.json").read_text())
    assert report["original"]["metric"] == {"name": "agreement", "value": 1.0}  # a classifier asks for it
