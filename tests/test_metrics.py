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
    assert metrics.choose_metric("auto", None) == "cosine"  # never top-1 agreement without labels
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


def test_cosine_and_nearest_neighbours():
    gen = torch.Generator().manual_seed(3)
    emb = torch.randn(50, 16, generator=gen)
    assert metrics.score("cosine", emb, None, emb) == pytest.approx(1.0)
    assert metrics.score("cosine", -emb, None, emb) == pytest.approx(-1.0)
    assert metrics.score("neighbors", emb * 2, None, emb) == 1.0  # scale does not move neighbours
    shuffled = emb[torch.randperm(50, generator=gen)]
    assert metrics.score("neighbors", shuffled, None, emb) < 0.3
    noisy = emb + 0.05 * torch.randn(50, 16, generator=gen)
    assert 0.5 < metrics.score("neighbors", noisy, None, emb) < 1.0  # a little noise moves a few neighbours
    assert metrics.drop("cosine", 1.0, 0.9) == pytest.approx(0.1)


def test_output_key_picks_the_named_output():
    t, h = torch.zeros(2), torch.ones(2)
    token = metrics.OUTPUT_KEY.set("embedding")
    try:
        assert metrics.primary_output({"logits": t, "embedding": h}) is h
        with pytest.raises(TypeError, match="output_key 'embedding' is not in"):
            metrics.primary_output({"logits": t})
    finally:
        metrics.OUTPUT_KEY.reset(token)
    token = metrics.OUTPUT_KEY.set("1")
    try:
        assert metrics.primary_output((t, h)) is h
    finally:
        metrics.OUTPUT_KEY.reset(token)
