"""Gates (pipeline.check_gates): each gate, the command line over the recipe, and missing metrics."""
from types import SimpleNamespace

import pytest

from compress.errors import UserError
from compress.pipeline import Options, check_gates
from compress.recipe import GatesSection


def report(before=0.99, after=0.97, speedup=(1.3, 1.2, 1.4), size=2.0, onnx=None):
    metric = lambda v: None if v is None else {"name": "accuracy", "value": v}  # noqa: E731
    return SimpleNamespace(original=SimpleNamespace(metric=metric(before)),
                           compressed=SimpleNamespace(metric=metric(after), onnx_metric=metric(onnx)),
                           ratios=SimpleNamespace(speedup={"1": 1.0, "32": speedup[0]},
                                                  speedup_ci={"1": [0.9, 1.1], "32": list(speedup[1:])},
                                                  onnx_bytes=size))


def gates(**kwargs):
    return {g.gate: g for g in check_gates(report(**kwargs.pop("r", {})), GatesSection(**kwargs), Options()).checked}


def test_each_gate_passes_and_fails():
    assert gates(max_metric_drop=0.03)["max_metric_drop"].passed
    assert not gates(max_metric_drop=0.01)["max_metric_drop"].passed
    assert gates(min_speedup=1.2)["min_speedup@batch32"].passed  # the largest batch by default
    assert not gates(min_speedup=1.25)["min_speedup@batch32"].passed  # the estimate 1.3 is not enough
    assert not gates(min_speedup=1.05, speedup_batch=1)["min_speedup@batch1"].passed
    assert gates(min_size_ratio=2.0)["min_size_ratio"].passed and not gates(min_size_ratio=2.1)["min_size_ratio"].passed
    assert gates() == {}


def test_command_line_wins_and_a_metric_is_needed():
    result = check_gates(report(), GatesSection(max_metric_drop=0.5), Options(max_metric_drop=0.01))
    assert result.checked[0].limit == 0.01 and not result.passed
    with pytest.raises(UserError, match="needs eval data"):
        check_gates(report(before=None, after=None), GatesSection(max_metric_drop=0.1), Options())


def test_the_metric_gate_holds_the_worse_of_torch_and_onnx():
    gate = gates(max_metric_drop=0.03, r={"after": 0.97, "onnx": 0.95})["max_metric_drop"]
    assert gate.measured_on == "model.onnx" and gate.value == 0.04 and not gate.passed
    gate = gates(max_metric_drop=0.03, r={"after": 0.97, "onnx": 0.98})["max_metric_drop"]
    assert gate.measured_on == "torch" and gate.passed
