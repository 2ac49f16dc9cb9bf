"""Counting and timing (compress/bench.py): MACs, percentiles, the speedup interval, size estimates."""
import numpy as np
import pytest
import torch
from torch import nn

from compress import bench
from compress.errors import UserError


def test_macs_of_a_linear_and_a_conv_are_counted_per_sample():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(8 * 5 * 5, 10))
    x = torch.zeros(4, 3, 5, 5)  # per sample, whatever the batch
    assert bench.count_macs(model, (x,)) == 8 * 3 * 9 * 25 + 200 * 10
    per_module = bench.macs_by_module(model, (x,))
    assert per_module["0"] == 8 * 3 * 9 * 25 and per_module["2"] == 2000
    assert bench.count_params(model) == 8 * 27 + 8 + 2000 + 10


def test_percentiles_and_mean():
    stats = bench.percentiles(list(range(1, 101)))
    assert stats["p50"] == pytest.approx(50.5) and stats["p90"] == pytest.approx(90.1) and stats["mean"] == 50.5


def test_speedup_interval_brackets_a_known_ratio_and_narrows_with_runs():
    rng = np.random.default_rng(0)
    widths = []
    for n in (20, 400):
        a = 2.0 * rng.lognormal(0, 0.1, n)
        b = 1.0 * rng.lognormal(0, 0.1, n)
        lo, hi = bench.speedup_interval(a, b)
        assert lo < 2.0 < hi
        widths.append(hi - lo)
    assert widths[1] < widths[0] / 2


def test_sizes_per_sample_and_the_memory_check(tmp_path):
    model = nn.Sequential(nn.Linear(100, 1000), nn.ReLU(), nn.Linear(1000, 10))
    x = torch.zeros(2, 100)
    # input 100 + outputs 1000 + 1000 + 10 floats per sample
    assert bench.activation_bytes_per_sample(model, (x,)) == 4 * (100 + 1000 + 1000 + 10)
    path = tmp_path / "m.onnx"
    torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                      dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False)
    assert 4 * (100 + 10) <= bench.onnx_bytes_per_sample(str(path)) <= 4 * (100 + 4 * 1000 + 10)
    bench.check_fits([1, 64], 4 * 2110, "bench.batch_sizes")
    with pytest.raises(UserError, match="batch size 10,000,000,000 needs about"):
        bench.check_fits([10**10], 4 * 2110, "bench.batch_sizes")


def test_measure_types_its_result_and_warns_of_every_noisy_speedup(tmp_path, monkeypatch):
    """The measurement is typed (speedups with their intervals, pairs by label) and `--json` keeps
    its keys; a speedup whose interval stays wide is named whether or not pairs were asked for
    (the warning was once only given inside the pairs loop)."""
    import torch
    from compress import exporting

    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    path = tmp_path / "m.onnx"
    exporting.export_onnx(model.eval(), (torch.randn(1, 8),), ["x"], path, 17, {"x": {0: "batch"}})
    feeds = {4: {"x": np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)}}
    monkeypatch.setattr(bench, "WARN_HALF_WIDTH", -1.0)  # every interval counts as wide
    result = bench.measure({"a": str(path), "b": str(path), "c": str(path)}, feeds, runs=4, warmup=1,
                           pairs=[("b", "c")])
    over = result.over_reference("b")["4"]
    assert isinstance(over, bench.Speedup) and over.low <= over.estimate <= over.high
    as_json = result.to_json()
    assert set(as_json) == {"latency_ms", "speedup", "speedup_ci", "pairs", "warnings"}
    assert set(as_json["speedup"]) == {"b", "c"} and set(as_json["pairs"]) == {"b/c"}
    assert as_json["pairs"]["b/c"]["4"]["ci"][0] <= as_json["pairs"]["b/c"]["4"]["speedup"]
    named = [w for w in result.warnings if "wide 95% interval" in w]
    assert any(" b speedup over a " in w for w in named) and any(" c speedup over b " in w for w in named)
