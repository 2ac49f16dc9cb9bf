"""The bad-input matrix: each mistake ends with its exit code, one line naming the thing, and no
output folder."""
import numpy as np
import pytest
import torch

from compress import pipeline
from compress.examples.digits import digits_resnet

RECIPE = """\
data: {{train: {train}, eval: {eval}}}
stages: [{{method: svd, targets: {{types: [Conv2d], include: ["layer*"]}}, ratio: 0.5}}]
finetune: {{steps: 2}}
bench: {{batch_sizes: [1], warmup: 1, runs: 2}}
{extra}"""


def make_case(name, tmp_path, digits_model, write_recipe):
    """(model path, recipe path, extra CLI args, expected exit code, expected message part)."""
    model, data, extra, args = digits_model, {"train": "bundled:digits/train", "eval": "bundled:digits/test"}, "", []
    if name == "missing model":
        model, message = tmp_path / "nope.pt", "model file not found"
    elif name == "empty model":
        model = tmp_path / "empty.pt"
        model.write_bytes(b"")
        message = "model file is empty"
    elif name == "truncated model":
        model = tmp_path / "cut.pt"
        model.write_bytes(digits_model.read_bytes()[:5000])
        message = "not a checkpoint"
    elif name == "not a checkpoint":
        model = tmp_path / "notes.pt"
        model.write_text("these are my notes\n")
        message = "not a checkpoint"
    elif name == "untrusted pickle":
        model = tmp_path / "whole.pt"
        torch.save(digits_resnet(width=8), model)
        message = "--trust-checkpoint"
    elif name == "recipe trusts a module":
        model = tmp_path / "sd.pt"
        torch.save(digits_resnet(width=8).state_dict(), model)
        extra, message = "model: {factory: 'missing_module:build', trust: [missing_module]}", "a recipe cannot trust code"
    elif name == "untrusted factory":
        model = tmp_path / "sd.pt"
        torch.save(digits_resnet(width=8).state_dict(), model)
        extra, message = "model: {factory: 'mypkg.models:build'}", "pass --trust-factory mypkg.models"
    elif name == "state dict does not fit":
        model = tmp_path / "sd.pt"
        torch.save(digits_resnet(width=8).state_dict(), model)
        extra = "model: {factory: 'compress.examples.digits:digits_resnet', kwargs: {width: 16}}"
        message = "weight 'stem.0.weight' has shape [8, 1, 3, 3], the model expects [16, 1, 3, 3]"
    elif name == "yaml syntax error":
        extra, message = "gates: {max_metric_drop: [0.1}", "recipe.yaml:5:"
    elif name == "unknown recipe key":
        extra, message = "gates: {max_metric_dro: 0.1}", "gates.max_metric_dro: unknown key; did you mean 'max_metric_drop'?"
    elif name == "wrong type":
        extra, message = "inputs: [{name: image, shape: [lots]}]", "inputs[0].shape[0]: Input should be a valid integer"
    elif name == "out of range":
        extra, message = "gates: {max_metric_drop: -1}", "gates.max_metric_drop: Input should be greater than or equal to 0"
    elif name == "pattern matches nothing":
        extra, message = "", "stages[0].targets.include[0]: pattern 'layer9.*' matches no layer"
    elif name == "data missing keys":
        np.savez(tmp_path / "pixels.npz", pixels=np.zeros((8, 1, 8, 8), np.float32))
        data["eval"], message = "pixels.npz", "pixels.npz: has no key 'image'"
    elif name == "data wrong dtype":
        torch.save({"image": torch.zeros(8, 1, 8, 8, dtype=torch.int64)}, tmp_path / "ints.pt")
        data["eval"], message = "ints.pt", "inputs (image [1, 8, 8] int64) do not fit the model"
    elif name == "data wrong shape":
        torch.save({"image": torch.zeros(8, 3, 8, 8)}, tmp_path / "rgb.pt")
        data["eval"], message = "rgb.pt", "inputs (image [3, 8, 8] float32) do not fit the model"
    elif name == "data file missing":
        data["train"], message = "absent.pt", "absent.pt: data file not found"
    elif name == "output exists":
        (tmp_path / "out").mkdir()
        (tmp_path / "out" / "keep.txt").write_text("mine")
        message = "output folder exists; pass --force"
    else:
        raise AssertionError(name)
    text = RECIPE.format(extra=extra, **data)
    if name == "pattern matches nothing":
        text = text.replace('include: ["layer*"]', 'include: ["layer9.*"]')
    return model, write_recipe(text), args, 2, message


CASES = ["missing model", "empty model", "truncated model", "not a checkpoint", "untrusted pickle",
         "recipe trusts a module", "untrusted factory", "state dict does not fit", "yaml syntax error", "unknown recipe key",
         "wrong type", "out of range", "pattern matches nothing", "data missing keys", "data wrong dtype",
         "data wrong shape", "data file missing", "output exists"]


@pytest.mark.parametrize("name", CASES)
def test_bad_input(name, tmp_path, digits_model, write_recipe, run_cli):
    model, recipe, args, code, message = make_case(name, tmp_path, digits_model, write_recipe)
    out = tmp_path / "out"
    existed = out.exists()
    result = run_cli("apply", "--recipe", recipe, model, "--out", out, "-q", *args)
    assert result.exit_code == code, result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if existed:
        assert [p.name for p in out.iterdir()] == ["keep.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_disk_failure_while_writing_leaves_nothing(tmp_path, digits_model, write_recipe, run_cli, monkeypatch):
    def disk_full(report, path):
        path.write_text("{")  # half a file, then the disk is full
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipeline.reporting, "write_json", disk_full)
    recipe = write_recipe(RECIPE.format(train="bundled:digits/train", eval="bundled:digits/test", extra=""))
    result = run_cli("apply", "--recipe", recipe, digits_model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2
    assert "cannot write the outputs (No space left on device); nothing was written" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_recipe_check(digits_model, example_for, run_cli):
    from ..conftest import REPO

    for recipe in sorted((REPO / "recipes").glob("*.yaml")):
        result = run_cli("recipe", "check", recipe, example_for(recipe))
        assert result.exit_code == 0, result.stderr
        assert "valid recipe" in result.output and "targets" in result.output
    result = run_cli("recipe", "check", REPO / "recipes" / "svd.yaml", digits_model)
    assert "exclude[0] '*.shortcut.*' matches 1: layer2.0.shortcut.0" in result.output
    assert "targets 8 layer(s)" in result.output
