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


def test_a_quantized_sweep_plots_each_runs_precision_and_its_float_twin(digits_model, write_recipe, run_cli, tmp_path):
    """With a quantize section every run ships int8 (or mixed, with layers kept float) and keeps the
    same allocation in float beside it: pareto.json has both, each with its precision, timed in the
    run's own report."""
    recipe = {**RECIPE, "quantize": {"mode": "static", "calibration_batches": 2, "min_agreement": 0.5,
                                     "max_metric_drop": 1}}
    path = write_recipe(yaml.safe_dump(recipe))
    out = tmp_path / "sweep"
    result = run_cli("sweep", "--recipe", path, digits_model, "--budgets", "2", "--out", out, "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "pareto.json").read_text())
    (point,), (twin,) = summary["points"], summary["float_points"]
    report = json.loads((out / "budget-2" / "report.json").read_text())
    assert point["precision"] == "int8" and twin["precision"] == "float"
    assert twin["latency_ms"] == report["compressed_float"]["latency_ms"]["4"]["p50"]
    assert twin["speedup"] == round(report["original"]["latency_ms"]["4"]["p50"] / twin["latency_ms"], 4)
    assert point["latency_ms"] == report["compressed"]["latency_ms"]["4"]["p50"]
    assert "| budget macs 2, float | float |" in (out / "pareto.md").read_text()


def test_the_plot_marks_float_int8_and_mixed_runs(tmp_path, monkeypatch):
    """The plot's series, drawn through a stand-in for matplotlib (not installed by the test extra)."""
    import sys
    import types

    from compress import sweep

    drawn = []

    class Axes:
        def plot(self, xs, ys, style, **kw):
            drawn.append((kw.get("label"), style, list(xs)))

        def __getattr__(self, name):
            return lambda *a, **k: None

    pyplot = types.SimpleNamespace(subplots=lambda **k: (types.SimpleNamespace(tight_layout=lambda: None,
                                                                               savefig=lambda *a, **k: None), Axes()),
                                   close=lambda fig: None)
    monkeypatch.setitem(sys.modules, "matplotlib", types.SimpleNamespace(use=lambda name: None, pyplot=pyplot))
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", pyplot)
    metric = {"name": "accuracy", "value": 0.9}
    points = [{"budget": b, "precision": kind, "latency_ms": ms, "metric": metric}
              for b, kind, ms in ((1.5, "float", 3.0), (2, "int8", 2.0), (3, "mixed", 1.5))]
    summary = {"batch": 4, "points": points, "float_points": [{**points[1], "precision": "float", "latency_ms": 2.5}],
               "reference": [{"label": "original", "latency_ms": 4.0, "metric": metric},
                             {"label": "int8 of the original", "latency_ms": 2.2, "metric": metric}]}
    assert sweep._plot(summary, tmp_path / "p.png")
    labels = {label: xs for label, _, xs in drawn if label}
    assert labels["budgeted, float"] == [3.0] and labels["budgeted, int8"] == [2.0]
    assert labels["budgeted, mixed (float and int8 layers)"] == [1.5]
    assert labels["the same allocations in float"] == [2.5] and labels["int8 of the original"] == [2.2]
    q = {"quantization": {"mode": "static"}}
    assert [sweep.precision(r) for r in ({}, q, {**q, "budget": {"float_layers": []}},
                                         {**q, "budget": {"float_layers": ["fc"]}})] == ["float", "int8", "int8", "mixed"]
