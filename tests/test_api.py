"""The Python API: a model built in Python, compressed in memory, then exported; recipes in every form."""
import json

import pytest
import torch

import compress
from compress.errors import RecipeError, UserError
from compress.examples.digits import digits_resnet, digits_split

RECIPE = {"stages": [{"method": "svd", "targets": {"types": ["Conv2d"], "include": ["layer*"]}, "ratio": 0.5}],
          "finetune": {"steps": 3}, "bench": {"batch_sizes": [1, 4], "warmup": 1, "runs": 3, "baselines": []}}


def test_compress_a_model_built_in_python_without_files_then_export(tmp_path):
    torch.manual_seed(0)
    model = digits_resnet(width=8).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train, test = digits_split("train"), digits_split("test")
    decisions = compress.plan(model, RECIPE, data={"train": train})
    assert {d["action"] for d in decisions} == {"factorize"} and len(decisions) == 9  # 8 block convs + a shortcut
    result = compress.apply(model, RECIPE, data={"train": train, "eval": test})
    assert result.finetune["steps"] == 3 and [d["name"] for d in result.decisions] == [d["name"] for d in decisions]
    assert sum(p.numel() for p in result.model.parameters()) < sum(p.numel() for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the caller's model is untouched
    with torch.no_grad():
        assert result.model(test["image"][:2]).shape == (2, 10)
    assert not list(tmp_path.iterdir())  # nothing written until export
    report = compress.export(result, tmp_path / "out")
    assert report.parity.passed and (tmp_path / "out" / "model.onnx").is_file()
    data = json.loads((tmp_path / "out" / "report.json").read_text())
    assert data["compressed"]["metric"]["name"] == "accuracy" and data["original"]["checkpoint_bytes"] is None
    with pytest.raises(UserError, match="output folder exists"):
        compress.export(result, tmp_path / "out")


def test_recipes_in_every_form(tmp_path, digits_model):
    text = "stages: [{method: svd, ratio: 0.5, targets: {types: [Conv2d], include: ['layer1.*']}}]\n" \
           "data: {eval: bundled:digits/test}\n"
    path = tmp_path / "r.yaml"
    path.write_text(text)
    from compress.recipe import parse_recipe

    plans = [compress.plan(digits_model, r) for r in (text, str(path), path, parse_recipe(text))]
    assert all(p == plans[0] for p in plans) and len(plans[0]) == 4


def test_errors_keep_their_messages(digits_model):
    with pytest.raises(RecipeError, match="stages.0.ratio|stages\\[0\\].ratio"):
        compress.plan(digits_model, {"stages": [{"method": "svd", "ratio": 7}]})
    with pytest.raises(UserError, match="'image' holds 64 non-finite values"):
        compress.plan(digits_model, RECIPE, data={"train": {"image": torch.full((1, 1, 8, 8), float("nan"))}})
    with pytest.raises(UserError, match="data role 'test'"):
        compress.plan(digits_model, RECIPE, data={"test": digits_split("test")})
