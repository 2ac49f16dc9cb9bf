import copy

import pytest
import torch
from torch import nn

from compress import linalg
from compress.bench import profile_layers
from compress.errors import RecipeError
from compress.layers import LowRankConv2d, layer_matrix
from compress.methods.trp import Trp, TrpStage
from compress.recipe import parse_recipe



class StridedNet(nn.Module):
    """Convs with stride 2 and padding other than 1, a 1x1 conv, and a classifier."""

    def __init__(self):
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 12, 3, stride=2, padding=2)
        self.b = nn.Conv2d(12, 12, (3, 5), stride=(2, 1), padding=(0, 2), bias=False)
        self.point = nn.Conv2d(12, 16, 1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.hidden = nn.Linear(16, 24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = torch.relu(self.first(x))
        x = torch.relu(self.c(self.point(self.b(torch.relu(self.a(x))))))
        return self.fc(torch.relu(self.hidden(x.mean((2, 3)))))


X = torch.randn(4, 3, 17, 15)


def make(scheme="channel", **kwargs):
    torch.manual_seed(0)
    model = StridedNet().eval()
    method = Trp(TrpStage(method="trp", scheme=scheme, **kwargs), 0)
    method.plan(model, profile_layers(model, (X[:1],)))
    return model, method


def test_default_targets_follow_the_authors():
    _, method = make()
    assert method.names == ["a", "b", "c", "hidden"]
    reasons = {d.name: d.reason for d in method.decisions if d.action == "keep"}
    assert set(reasons) == {"first", "point", "fc"}


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_projection_keeps_energy_with_minimal_rank(scheme):
    model, method = make(scheme, energy=0.8)
    before = {n: layer_matrix(model.get_submodule(n), scheme).detach().clone() for n in method.names}
    method.prepare(model)
    for name in method.names:
        s = linalg.singular_values(before[name])
        r = method.ranks[name]
        assert r == linalg.energy_rank(s, 0.8)
        after = layer_matrix(model.get_submodule(name), scheme).detach()
        assert torch.linalg.matrix_rank(after) == r
        assert torch.allclose(after, _truncate(before[name], r), atol=1e-5)


def _truncate(matrix, rank):
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] @ torch.diag(s[:rank]) @ vh[:rank]


@pytest.mark.parametrize("scheme", ["channel", "spatial"])
def test_decomposed_model_equals_projected_dense_model(scheme):
    model, method = make(scheme, energy=0.7)
    method.prepare(model)  # the weights are now exactly of the projected ranks
    dense = copy.deepcopy(model)
    method.finalize(model)
    factorized = [n for n, m in model.named_modules() if isinstance(m, LowRankConv2d)]
    assert {"a", "b", "c"} <= set(factorized)
    with torch.no_grad():
        assert torch.allclose(model(X), dense(X), atol=1e-5)
    ranks = {d.name: d.rank for d in method.decisions if d.action == "factorize"}
    assert all(ranks[n] == method.ranks[n] for n in ranks)
    assert {e["name"]: e["rank"] for e in method.edits()} == ranks


def test_nuclear_term_gradient_is_lambda_times_subgradient():
    model, method = make(nuclear={"lambda": 0.01})
    method.prepare(model)
    for p in model.parameters():
        p.grad = None
    method.loss(model, {}, None)["nuclear"].backward()
    for name in method.names:
        assert torch.allclose(model.get_submodule(name).weight.grad, 0.01 * method.subgradients[name])
    # the loss value at the projection is lambda times the sum of nuclear norms
    value = float(method.loss(model, {}, None)["nuclear"].detach())
    norms = sum(float(torch.linalg.matrix_norm(layer_matrix(model.get_submodule(n), "channel").detach(), "nuc"))
                for n in method.names)
    assert value == pytest.approx(0.01 * norms, rel=1e-4)


def test_projection_and_nuclear_term_follow_the_period():
    model, method = make(period=3)
    method.prepare(model)
    projected = []
    original = method.project
    method.project = lambda m: (projected.append(method.step), original(m))
    terms = []
    for step in range(7):
        terms.append(bool(method.loss(model, {}, None)))
        method.after_step(model, step, 0.01)
    assert projected == [3, 6]
    assert terms == [True, False, False, True, False, False, True]


def test_threshold_rank_option():
    model, method = make(energy=1.0, threshold=0.5)
    method.prepare(model)  # energy 1.0: the projection keeps every singular value
    weights = {n: layer_matrix(model.get_submodule(n), "channel").detach().clone() for n in method.names}
    method.finalize(model)
    factorized = [d for d in method.decisions if d.action == "factorize"]
    assert factorized
    for d in factorized:  # the rank is exactly the count of singular values >= half the largest
        s = linalg.singular_values(weights[d.name])
        assert d.rank == int((s >= 0.5 * s[0]).sum()) < d.full_rank


@pytest.mark.parametrize("stage,message", [
    ("{method: trp, energy: 0}", "stages[0].energy: Input should be greater than 0"),
    ("{method: trp, energy: 1.5}", "stages[0].energy: Input should be less than or equal to 1"),
    ("{method: trp, period: 0}", "stages[0].period: Input should be greater than or equal to 1"),
    ("{method: trp, nuclear: {lambda: -1}}", "stages[0].nuclear.lambda: Input should be greater than or equal to 0"),
    ("{method: trp, nuclear: {lamda: 1}}", "stages[0].nuclear.lamda: unknown key; did you mean 'lambda'?"),
])
def test_bad_recipe_values(stage, message):
    with pytest.raises(RecipeError, match="^recipe: " + message.replace("[", r"\[").replace("]", r"\]")):
        parse_recipe(f"stages: [{stage}]")


def test_spatial_scheme_on_a_1x1_conv_is_a_recipe_error():
    torch.manual_seed(0)
    model = StridedNet().eval()
    method = Trp(TrpStage(method="trp", scheme="spatial", targets={"types": ["Conv2d"]}), 0)
    with pytest.raises(RecipeError, match=r"stages\[0\].scheme: .*'point' is a 1x1 conv"):
        method.plan(model, profile_layers(model, (X[:1],)))


def test_trp_recipe_end_to_end(apply_shipped, digits_model):
    _, report = apply_shipped("trp.yaml", digits_model)
    assert report["parity"]["passed"]
    assert report["compressed"]["macs"] < report["original"]["macs"]
    assert any(row["action"] == "factorize" and row["method"] == "trp" for row in report["layers"])
    assert report["post_finetune"]["steps"] > 0
    assert report["compressed"]["onnx_metric"]["value"] == pytest.approx(report["compressed"]["metric"]["value"], abs=1e-6)
