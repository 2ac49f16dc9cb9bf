"""Metrics (compress/metrics.py) against independent computations."""
import pytest
import torch
from sklearn.metrics import roc_auc_score

from compress import metrics


def test_auc_matches_scikit_learn_with_ties():
    gen = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (500,), generator=gen).float()  # many ties
    labels = (torch.rand(500, generator=gen) < 0.3).float()
    assert metrics.auc(scores, labels) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    with pytest.raises(ValueError):
        metrics.auc(scores, torch.ones(500))


def test_choose_metric_and_drop_direction():
    assert metrics.choose_metric("auto", None) == "agreement"
    assert metrics.choose_metric("auto", torch.tensor([0, 3, 1])) == "accuracy"
    assert metrics.choose_metric("auto", torch.tensor([0.0, 1.0, 1.0])) == "auc"
    assert metrics.choose_metric("auto", torch.tensor([0.5, 2.0])) == "mse"
    assert metrics.choose_metric("mse", torch.tensor([0, 1])) == "mse"
    assert metrics.drop("accuracy", 0.99, 0.97) == pytest.approx(0.02)
    assert metrics.drop("mse", 0.10, 0.15) == pytest.approx(0.05)  # lower is better: a rise is a drop


def test_scores():
    out = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 1.0]])
    assert metrics.score("accuracy", out, torch.tensor([0, 1, 1]), None) == pytest.approx(2 / 3)
    assert metrics.score("agreement", out, None, torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])) == pytest.approx(2 / 3)
    assert metrics.score("mse", torch.tensor([[1.0], [3.0]]), torch.tensor([1.0, 1.0]), None) == pytest.approx(2.0)


def test_primary_output_of_the_kinds_libraries_return():
    t = torch.zeros(2)
    assert metrics.primary_output(t) is t
    assert metrics.primary_output((t, torch.ones(1))) is t
    assert metrics.primary_output({"logits": t, "hidden": torch.ones(1)}) is t
    assert metrics.primary_output({"embedding": t}) is t

    class Output:
        logits = t

    assert metrics.primary_output(Output()) is t
    with pytest.raises(TypeError):
        metrics.primary_output(None)
