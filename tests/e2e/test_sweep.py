import json
import os
import stat

import pytest
import yaml

STAGE = {"method": "svd", "targets": {"types": ["Conv2d"], "include": ["layer*"], "exclude": ["*.shortcut.*"]},
         "scheme": "spatial"}
RECIPE = {"data": {"calibration": "bundled:digits/calibration", "eval": "bundled:digits/test", "batch_size": 64},
          "stages": [STAGE], "budget": {"macs": 2, "probes": 1},
          "bench": {"batch_sizes": [1, 4], "warmup": 1, "runs": 3, "baselines": []}}


def test_sweep_writes_one_run_per_budget_and_the_pareto_front(digits_model, write_recipe, run_cli, tmp_path,
                                                               monkeypatch):
    from compress.methods import rank_allocation as budget

    calls = []
    original = budget.input_moments
    monkeypatch.setattr(budget, "input_moments", lambda *a, **k: calls.append(1) or original(*a, **k))
    path = write_recipe(yaml.safe_dump(RECIPE))
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--recipe", path, digits_model, "--budgets", "3,1.5", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    assert len(calls) == 1  # the calibration statistics are taken once for the whole sweep
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask  # an ordinary folder, not mkdtemp's 0700
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "sweep"]  # no work, lock or old folder
    summary = json.loads((out / "pareto.json").read_text())
    assert summary["target"] == "macs" and summary["batch"] == 4
    assert [p["budget"] for p in summary["points"]] == [1.5, 3.0]
    assert [r["label"] for r in summary["reference"]] == ["original"]
    for point in summary["points"]:
        report = json.loads((out / point["folder"] / "report.json").read_text())
        assert report["budget"]["target"] == {"macs": point["budget"]} and report["budget"]["met"]
        assert point["macs"] == report["compressed"]["macs"]
    assert summary["points"][0]["macs"] > summary["points"][1]["macs"]
    markdown = (out / "pareto.md").read_text()
    try:
        import matplotlib  # noqa: F401
        assert (out / "pareto.png").stat().st_size > 0 and "pareto.png:" in markdown
    except ImportError:
        assert "pareto.png skipped" in markdown and not (out / "pareto.png").exists()
    # a previous sweep is replaced with --force; a folder with someone else's files never is
    assert run_cli("sweep", "--recipe", path, digits_model, "--budgets", "2", "--out", out, "-q").exit_code == 2
    assert run_cli("sweep", "--recipe", path, digits_model, "--budgets", "2", "--out", out, "-q",
                   "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir() if p.is_dir()) == ["budget-2"]
    (out / "budget-2" / "notes.txt").write_text("mine")
    result = run_cli("sweep", "--recipe", path, digits_model, "--budgets", "2", "--out", out, "-q", "--force")
    assert result.exit_code == 2 and "replaces only a previous compress sweep" in result.output
    assert (out / "budget-2" / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize("budgets,recipe,says", [
    ("2,x", RECIPE, "is not a comma-separated list of numbers"),
    ("2,2", RECIPE, "a budget is given twice"),
    ("0.5", RECIPE, "not a valid budget.macs"),
    ("2", {k: v for k, v in RECIPE.items() if k != "budget"}, "the recipe has no budget: section"),
])
def test_sweep_errors_are_one_line_and_write_nothing(digits_model, write_recipe, run_cli, tmp_path, budgets, recipe,
                                                     says):
    path = write_recipe(yaml.safe_dump(recipe))
    result = run_cli("sweep", "--recipe", path, digits_model, "--budgets", budgets, "--out", tmp_path / "sweep")
    assert result.exit_code == 2 and says in result.output, result.output
    assert not (tmp_path / "sweep").exists()


def test_a_run_that_misses_a_gate_does_not_stop_the_sweep_but_it_exits_3(digits_model, write_recipe, run_cli,
                                                                          tmp_path):
    recipe = {**RECIPE, "gates": {"max_metric_drop": 0.0001}}  # svd without fine-tuning loses more than that
    path = write_recipe(yaml.safe_dump(recipe))
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--recipe", path, digits_model, "--budgets", "2,3", "--out", out, "-q")
    assert result.exit_code == 3, result.output
    assert "2 of 2 runs missed a gate: budget-2, budget-3" in result.output
    assert (out / "pareto.json").exists() and (out / "budget-3" / "report.json").exists()
