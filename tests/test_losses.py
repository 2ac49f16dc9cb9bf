"""Losses by output kind and shape (compress/losses.py) against independent computations."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.losses import detect_output_kind, distill_loss, task_loss


def test_single_output_kl_is_bernoulli_and_not_zero():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, 1, generator=gen), torch.randn(16, 1, generator=gen)
    ps, pt = torch.sigmoid(s), torch.sigmoid(t)
    expected = (pt * torch.log(pt / ps) + (1 - pt) * torch.log((1 - pt) / (1 - ps))).mean()
    assert distill_loss("kl", s, t) == pytest.approx(float(expected), rel=1e-5)  # was identically 0 over dim=1
    assert distill_loss("kl", s.squeeze(1), t.squeeze(1)) == pytest.approx(float(expected), rel=1e-5)  # (B,) too
    assert float(distill_loss("kl", s, s)) == pytest.approx(0.0, abs=1e-7)
    # the same distributions given as probabilities
    assert distill_loss("kl", ps, pt, kind="probabilities") == pytest.approx(float(expected), rel=1e-4)


def test_kl_over_the_last_axis_of_sequence_outputs():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 5, 7, generator=gen), torch.randn(2, 5, 7, generator=gen)
    per_position = (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(-1)
    assert distill_loss("kl", s, t) == pytest.approx(float(per_position.mean()), rel=1e-5)
    two_d = distill_loss("kl", s[:, 0], t[:, 0])
    assert two_d == pytest.approx(float(per_position[:, 0].mean()), rel=1e-5)
    assert distill_loss("kl", s, t, kind="log_probabilities") == pytest.approx(float(
        distill_loss("kl", F.log_softmax(s, -1), F.log_softmax(t, -1), kind="log_probabilities")), rel=1e-5)


def test_task_losses_by_output_kind():
    gen = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(8, 4, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    ce = F.cross_entropy(logits, labels)
    assert task_loss("cross_entropy", F.softmax(logits, 1), labels, "probabilities") == pytest.approx(float(ce), rel=1e-4)
    assert task_loss("cross_entropy", F.log_softmax(logits, 1), labels, "log_probabilities") == pytest.approx(float(ce), rel=1e-5)
    z, y = torch.randn(8, generator=gen), (torch.rand(8, generator=gen) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(z, y)
    assert task_loss("bce", torch.sigmoid(z), y, "probabilities") == pytest.approx(float(bce), rel=1e-4)
    p = torch.tensor([0.0, 1.0, 0.5])  # saturated probabilities: clamped, finite, still trainable
    loss = task_loss("bce", p.requires_grad_(), torch.tensor([1.0, 0.0, 1.0]), "probabilities")
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(p.grad).all()


def test_cosine_distillation():
    x = torch.randn(4, 6)
    assert float(distill_loss("cosine", x, 3 * x)) == pytest.approx(0.0, abs=1e-6)
    assert float(distill_loss("cosine", x, -x)) == pytest.approx(2.0, abs=1e-6)


def test_output_kind_detection():
    out = torch.randn(32, 3)
    assert detect_output_kind(nn.Sequential(nn.Linear(2, 1), nn.Sigmoid()), out)[0] == "probabilities"
    assert detect_output_kind(nn.Sequential(nn.Linear(2, 3), nn.LogSoftmax(-1)), out)[0] == "log_probabilities"
    linear = nn.Linear(2, 3)
    assert detect_output_kind(linear, out)[0] == "logits"
    assert detect_output_kind(linear, F.softmax(out, -1))[0] == "probabilities"  # softmax inside forward()
    assert detect_output_kind(linear, F.log_softmax(out, -1))[0] == "log_probabilities"
    kind, why = detect_output_kind(linear, torch.rand(32, 1))
    assert kind == "probabilities" and "[0, 1]" in why


def test_cross_entropy_over_positions_takes_classes_from_the_last_axis():
    import math

    from compress.metrics import score

    torch.manual_seed(0)
    for length, vocab in ((5, 7), (6, 6)):  # L != V once raised; L == V was silently wrong
        logits = torch.randn(3, length, vocab)
        labels = torch.randint(0, vocab, (3, length))
        by_hand = sum(-torch.log_softmax(logits[b, i], dim=-1)[labels[b, i]] for b in range(3)
                      for i in range(length)) / (3 * length)
        assert math.isclose(float(task_loss("cross_entropy", logits, labels)), float(by_hand), rel_tol=1e-5)
        hits = sum(int(logits[b, i].argmax() == labels[b, i]) for b in range(3) for i in range(length))
        assert math.isclose(score("accuracy", logits, labels, None), hits / (3 * length), rel_tol=1e-6)


def test_a_linear_head_whose_outputs_happen_to_lie_in_0_1_is_logits():
    from types import SimpleNamespace

    from compress.context import find_output_kind

    class Head(nn.Module):
        def __init__(self, squash):
            super().__init__()
            self.fc, self.squash = nn.Linear(4, 1), squash

        def forward(self, x):
            out = self.fc(x)
            return torch.sigmoid(out) if self.squash else out

    x = torch.rand(64, 4)
    recipe = SimpleNamespace(finetune=SimpleNamespace(output="auto"))
    for squash, kind in ((False, "logits"), (True, "probabilities")):
        model = Head(squash)
        with torch.no_grad():  # a head whose raw outputs lie in (0, 1) on this sample
            model.fc.weight.fill_(0.1)
            model.fc.bias.fill_(0.2)
        found = find_output_kind(model, ["x"], (x,), {"calibration": None, "train": None, "eval": None}, recipe)
        assert found["kind"] == kind, found


def test_the_zero_distillation_guard_allows_a_kl_that_is_truly_zero():
    from compress.errors import UserError
    from compress.finetune import _check_distillation_sees

    teacher = torch.randn(8, 5)
    student = teacher + 3.0  # the same distributions: a KL of 0 is the right answer
    kl = distill_loss("kl", student, teacher)
    assert float(kl) < 1e-6
    _check_distillation_sees(torch.zeros(()), student, teacher, "kl", "logits")  # no error: nothing to see
    with pytest.raises(UserError, match="exactly 0 while the student's outputs differ"):
        _check_distillation_sees(torch.zeros(()), student * 2, teacher, "kl", "logits")  # a loss that is blind
