"""A method from outside the package, through the public entry point only: the plug-in in
examples/plugin is made visible to a fresh interpreter as an installed distribution would be (a
.dist-info with its entry point on the path), and driven through the CLI. The model it writes
reloads here, where the plug-in is not installed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import compress
from compress.checkpoint import load_model
from compress.data import synthetic_sample
from tests.conftest import shortened

PLUGIN = Path(__file__).resolve().parents[2] / "examples" / "plugin"


def installed(tmp_path, entry_points: str) -> dict:
    """An environment in which a distribution with these entry points is installed."""
    site = tmp_path / "site"
    info = site / "compress_rsvd-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: compress-rsvd\nVersion: 0.1.0\n")
    (info / "entry_points.txt").write_text(entry_points)
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PLUGIN), *sys.path])}


@pytest.fixture
def plugin_env(tmp_path):
    return installed(tmp_path, "[compress.methods]\nrsvd = compress_rsvd:RandomizedSvd\n")


def cli(env, *args):
    return subprocess.run([sys.executable, "-m", "compress", *map(str, args)], env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_schema_lists_the_plugin_and_plan_shows_its_rows(plugin_env, digits_model, tmp_path):
    schema = cli(plugin_env, "recipe", "schema")
    assert schema.returncode == 0 and '"rsvd"' in schema.stdout and schema.stderr == ""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("inputs: [{name: image, shape: [1, 8, 8]}]\n"
                      "stages: [{method: rsvd, rank: 4, targets: {types: [Conv2d], include: ['layer*']}}]\n")
    plan = cli(plugin_env, "plan", "-r", recipe, digits_model, "--json")
    rows = json.loads(plan.stdout)
    assert plan.returncode == 0 and rows and {r["method"] for r in rows} == {"rsvd"}
    assert any(r["action"] == "factorize" and r["rank"] == 4 for r in rows)
    assert cli(os.environ, "plan", "-r", recipe, digits_model).returncode == 2  # not installed: unknown method


def test_a_params_budget_allocates_the_plugin_and_the_output_reloads_without_it(plugin_env, digits_model, tmp_path):
    recipe = shortened(PLUGIN / "recipe.yaml", tmp_path, steps=4)
    out = tmp_path / "out"
    result = cli(plugin_env, "apply", "-r", recipe, digits_model, "--out", out, "-q")
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["budget"]["met"] and report["ratios"]["params"] >= 1.5
    factorized = [row for row in report["layers"] if row["action"] == "factorize"]
    assert factorized and all(row["method"] == "rsvd" and "budget_cost" in row for row in factorized)
    assert "rsvd" not in compress.methods.METHODS  # this process has no plug-in ...
    again = compress.load(out)  # ... and rebuilds the model from compression.json alone
    saved = load_model(out / "model.pt")
    x = synthetic_sample([{"name": "image", "shape": [1, 8, 8]}])
    with torch.no_grad():
        assert torch.equal(again.eval()(*x), saved.model.eval()(*x))
    params = sum(p.numel() for p in again.parameters())
    assert params == report["compressed"]["params"]


@pytest.mark.parametrize("entry,words", [
    ("rsvd = os:getcwd", "is builtin_function_or_method, not a subclass of compress.methods.Method"),
    ("svd = compress_rsvd:RandomizedSvd", "its class says name 'rsvd'"),
    ("rsvd = no_such_package:Method", "cannot be loaded (No module named 'no_such_package')"),
])
def test_a_broken_plugin_is_left_out_with_one_warning(entry, words, tmp_path):
    result = cli(installed(tmp_path, f"[compress.methods]\n{entry}\n"), "recipe", "schema")
    assert result.returncode == 0 and '"svd"' in result.stdout and '"rsvd"' not in result.stdout
    assert result.stderr.count("\n") == 1 and "left out" in result.stderr and words in result.stderr, result.stderr
