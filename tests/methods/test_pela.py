import copy

import pytest
import torch
from torch import nn

from compress import layers
from compress.bench import profile_layers
from compress.data import Dataset
from compress.examples.digits_transformer import digits_transformer, tokens_split
from compress.finetune import finetune
from compress.methods.pela import Pela, PelaStage, default_feature_modules
from compress.recipe import FinetuneSection


TOKENS = tokens_split("calibration")
INPUTS = (TOKENS["tokens"][:8], TOKENS["mask"][:8])


def planned(**stage):
    torch.manual_seed(0)
    model = digits_transformer(dim=32, hidden=64).eval()
    method = Pela(PelaStage.model_validate({"method": "pela", **stage}), 0)
    method.plan(model, profile_layers(model, tuple(t[:1] for t in INPUTS)))
    return model, method


@pytest.mark.parametrize("rows,cols,rho", [(64, 64, 2.0), (128, 32, 2.0), (100, 30, 3.0), (48, 200, 1.5)])
def test_rank_rule_gives_about_rho_times_fewer_parameters(rows, cols, rho):
    stage = PelaStage(method="pela", rho=rho)
    r = stage.choose_rank(None, rows, cols)
    assert r * (rows + cols) <= rows * cols / rho < (r + 1) * (rows + cols)


def test_default_targets_and_features():
    model, method = planned()
    kept = {d.name: d.reason for d in method.decisions if d.action == "keep"}
    assert set(kept) == {"head"} and "output head" in kept["head"]
    assert method.feature_names == ["blocks.0", "blocks.1"] == default_feature_modules(model)


def _student_and_teacher(**stage):
    model, method = planned(**stage)
    teacher = copy.deepcopy(model)
    return model, teacher, method


def test_full_rank_student_equals_teacher_and_all_losses_are_zero():
    model, teacher, method = _student_and_teacher(beta=1.0, gamma=1.0)
    for d in method.decisions:  # force full rank (the plan keeps such layers dense: no MAC saving)
        if d.name != "head":
            d.action, d.rank = "factorize", d.full_rank
    method.prepare(model)
    method.start_finetune(model, teacher)
    with torch.no_grad():
        reference = teacher(*INPUTS)
        outputs = model(*INPUTS)
    assert torch.allclose(outputs, reference, atol=1e-5)
    terms = method.loss(model, {}, outputs)
    assert set(terms) == {"feature", "output", "weight"}
    terms = {k: float(v.detach()) for k, v in terms.items()}
    assert terms["feature"] < 1e-9 and terms["output"] < 1e-9, terms
    # METHODS.md's (||BA - W||_max - eps)^2 at ||BA - W||_max = 0 is eps^2 (the hinge form gives 0)
    assert terms["weight"] == pytest.approx(method.stage.eps ** 2, rel=1e-3)


def test_weight_perturbation_matches_a_direct_computation():
    model, _, method = _student_and_teacher(gamma=1.0, eps=0.01)
    method.prepare(model)
    direct = []
    for name, original in method.originals.items():
        deviation = layers.dense_weight(model.get_submodule(name)) - original
        direct.append((deviation.abs().max() - 0.01) ** 2)  # wp_form: squared, the default
    assert float(method.weight_perturbation(model).detach()) == pytest.approx(float(sum(direct).detach()) / len(direct), rel=1e-5)


def test_gradients_reach_the_factors_and_never_the_teacher():
    model, teacher, method = _student_and_teacher(gamma=1.0)
    method.prepare(model)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    data = Dataset({k: v[:64] for k, v in TOKENS.items() if k != "target"}, "unlabeled")
    result = finetune(model, data, ["tokens", "mask"], "target", FinetuneSection(steps=2, lr=1e-3), 32,
                      teacher=teacher, methods=[method], progress=False)
    assert set(result.loss_terms) == {"pela.feature", "pela.weight"}  # no labels: distillation only
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    factorized = model.get_submodule("blocks.0.query")
    assert factorized.first.weight.grad is not None and factorized.second.weight.grad is not None


def test_bad_feature_pattern_is_a_recipe_error():
    from compress.errors import RecipeError

    with pytest.raises(RecipeError, match=r"stages\[0\].features\[0\]: pattern 'encoder.\*' matches no module"):
        planned(features=["encoder.*"])


@pytest.mark.parametrize("recipe", ["pela.yaml", "pela-unlabeled.yaml", "afm-pela.yaml"])
def test_pela_recipes_end_to_end(recipe, apply_shipped, transformer_model):
    _, report = apply_shipped(recipe, transformer_model)
    assert report["parity"]["passed"] and report["ratios"]["params"] > 1.5
    terms = set(report["finetune"]["loss_terms"])
    if recipe == "pela.yaml":
        assert report["compressed"]["metric"]["name"] == "accuracy" and "task" in terms
    else:  # label-free: no target key, distillation only, agreement with the original
        assert report["compressed"]["metric"]["name"] == "agreement"
        assert terms == {"pela.feature", "pela.output", "pela.weight"}


def test_default_targets_leave_the_stem_and_downsampling_convs_dense():
    class Vision(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, 32, 4, stride=4)  # patch embedding
            self.mix = nn.Conv2d(32, 32, 3, padding=1)
            self.down = nn.Conv2d(32, 64, 3, stride=2, padding=1)
            self.fc1 = nn.Linear(64, 64)
            self.head = nn.Linear(64, 10)

        def forward(self, x):
            x = self.down(torch.relu(self.mix(self.patch(x))))
            return self.head(torch.relu(self.fc1(x.mean((2, 3)))))

    model = Vision().eval()
    method = Pela(PelaStage(method="pela"), 0)
    rows = {d.name: d for d in method.plan(model, profile_layers(model, (torch.zeros(1, 3, 32, 32),)))}
    assert "patch embedding" in rows["patch"].reason and "downsampling" in rows["down"].reason
    assert "output head" in rows["head"].reason
    assert rows["mix"].action == rows["fc1"].action == "factorize"
    assert rows["fc1"].rank == 16  # floor(64 * 64 / (2 * 128))


def test_weight_perturbation_forms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    for form, near in (("squared", "pushed"), ("hinge", "left alone")):
        method = Pela(PelaStage(method="pela", rank=32, gamma=1.0, eps=0.5, wp_form=form,
                                targets={"include": ["0"]}), 0)
        net = copy.deepcopy(model)
        method.plan(net, profile_layers(net, (torch.zeros(1, 32),)))
        method.decisions[0].action = "factorize"  # full rank saves nothing, so the plan kept it dense
        method.prepare(net)
        value = float(method.weight_perturbation(net).detach())  # full rank: |BA - W| ~ 1e-7, well within eps
        if near == "pushed":
            assert value == pytest.approx(0.25, rel=1e-3)  # (0 - 0.5)^2: the paper's formula
        else:
            assert value == 0.0


def test_init_afm_starts_exactly_from_afms_factors():
    from compress.methods.afm import Afm, AfmStage

    torch.manual_seed(0)
    data = tokens_split("calibration")
    batches = lambda: ((data["tokens"][i:i + 50], data["mask"][i:i + 50]) for i in range(0, 200, 50))  # noqa: E731
    sample = (data["tokens"][:1], data["mask"][:1])
    model = digits_transformer().eval()
    pela_model, afm_model = copy.deepcopy(model), copy.deepcopy(model)
    pela = Pela(PelaStage(method="pela", init="afm"), 0)
    assert pela.needs_calibration and not Pela(PelaStage(method="pela"), 0).needs_calibration
    pela.calibrate(pela_model, batches)
    pela.plan(pela_model, profile_layers(pela_model, sample))
    pela.prepare(pela_model)
    ranks = {d.name: d.rank for d in pela.decisions if d.action == "factorize"}
    assert ranks and all(d.extra["init"] == "afm" for d in pela.decisions)
    afm = Afm(AfmStage(method="afm", rank=1, ranks=ranks, targets={"include": sorted(ranks)}), 0)
    afm.calibrate(afm_model, batches)
    afm.plan(afm_model, profile_layers(afm_model, sample))
    afm.prepare(afm_model)
    inputs = (data["tokens"][:32], data["mask"][:32])
    with torch.no_grad():  # the chain starts from afm's factors: the same outputs before any step
        assert torch.allclose(pela_model(*inputs), afm_model(*inputs), atol=1e-5)
        assert not torch.allclose(pela_model(*inputs), model(*inputs), atol=1e-3)
    from compress.checkpoint import apply_edits

    rebuilt = copy.deepcopy(model)  # and the edits (factors with a bias) rebuild it for reloading
    apply_edits(rebuilt, pela.edits())
    rebuilt.load_state_dict(pela_model.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt(*inputs), pela_model(*inputs))


# ---- chains: an `afm` stage, then a `pela` stage on the same layers ----

def _chain_recipe(first: dict, second: dict, steps: int = 0) -> dict:
    return {"data": {"train": "bundled:digits-tokens-unlabeled/train",
                     "calibration": "bundled:digits-tokens-unlabeled/calibration",
                     "eval": "bundled:digits-tokens-unlabeled/test", "batch_size": 64},
            "stages": [first, second], "finetune": {"steps": steps, "lr": 0.001}}


BLOCK_LINEARS = {"include": ["blocks.*"], "types": ["Linear"]}


def test_chain_afm_then_pela_starts_from_afms_factors_and_trains_them(transformer_model):
    import compress

    afm = {"method": "afm", "targets": BLOCK_LINEARS, "ratio": 0.5}
    pela = {"method": "pela", "targets": BLOCK_LINEARS, "beta": 1.0, "gamma": 1.0}
    inputs = (TOKENS["tokens"][:32], TOKENS["mask"][:32])
    alone = compress.apply(transformer_model, {**_chain_recipe(afm, afm), "stages": [afm]})
    chained = compress.apply(transformer_model, _chain_recipe(afm, pela))
    with torch.no_grad():  # before the first step the chain is exactly afm's model
        assert torch.equal(chained.model(*inputs), alone.model(*inputs))
    refined = [d for d in chained.decisions if d["action"] == "refine"]
    factorized = [d for d in chained.decisions if d["action"] == "factorize"]
    assert len(refined) == len(factorized) == 12
    assert {d["name"]: d["rank"] for d in refined} == {d["name"]: d["rank"] for d in factorized}
    assert all(d["chain"] == "stages[0] afm -> stages[1] pela" and d["method"] == "pela" for d in refined)

    trained = compress.apply(transformer_model, _chain_recipe(afm, pela, steps=3))
    assert set(trained.finetune["loss_terms"]) >= {"pela.feature", "pela.output", "pela.weight"}
    with torch.no_grad():
        assert not torch.allclose(trained.model(*inputs), alone.model(*inputs), atol=1e-4)
    query = trained.model.blocks[0].query  # still afm's structure: rank and bias on the second factor
    assert isinstance(query, layers.LowRankLinear) and query.first.out_features == 16
    assert query.second.bias is not None and query.first.bias is None


def test_chain_reloads_from_compression_json(transformer_model, tmp_path):
    import json

    import compress

    afm = {"method": "afm", "targets": BLOCK_LINEARS, "ratio": 0.5}
    pela = {"method": "pela", "targets": BLOCK_LINEARS}
    result = compress.apply(transformer_model, _chain_recipe(afm, pela, steps=2))
    compress.export(result, tmp_path / "out")
    edits = json.loads((tmp_path / "out" / "compression.json").read_text())["edits"]
    assert len(edits) == 12 and all(e["op"] == "factorize" and e["bias"] for e in edits)
    assert {e["chain"] for e in edits} == {"stages[0] afm -> stages[1] pela"}
    rows = json.loads((tmp_path / "out" / "report.json").read_text())["layers"]
    assert sum(r["action"] == "refine" for r in rows) == 12
    reloaded = compress.load(tmp_path / "out")
    inputs = (TOKENS["tokens"][:16], TOKENS["mask"][:16])
    with torch.no_grad():
        assert torch.equal(reloaded(*inputs), result.model(*inputs))


@pytest.mark.parametrize("first,second,says", [
    ({"method": "pela"}, {"method": "afm", "targets": BLOCK_LINEARS},
     "stages[1].targets: layer 'blocks.0.query' is already changed by stages[0] (pela); afm cannot continue "
     "from pela (allowed chains: afm -> pela, svd -> pela)"),
    ({"method": "afm", "targets": BLOCK_LINEARS, "ratio": 0.5}, {"method": "svd", "targets": BLOCK_LINEARS},
     "svd cannot continue from afm"),
    ({"method": "afm", "targets": BLOCK_LINEARS, "ratio": 0.5}, {"method": "afm", "targets": BLOCK_LINEARS},
     "afm cannot continue from afm"),
    ({"method": "group_envelope", "targets": {"include": ["blocks.0.up"]}, "keep": 0.5},
     {"method": "pela", "targets": {"include": ["blocks.0.up"]}},
     "pela cannot continue from group_envelope"),
])
def test_invalid_chains_are_one_line_recipe_errors(transformer_model, first, second, says):
    import compress
    from compress.errors import RecipeError

    with pytest.raises(RecipeError) as err:
        compress.plan(transformer_model, _chain_recipe(first, second))
    message = str(err.value)
    assert says in message and "\n" not in message and message.endswith("exclude it from one of them")


def test_invalid_chain_from_the_cli_exits_2_and_writes_nothing(transformer_model, tmp_path, run_cli):
    import yaml

    recipe = tmp_path / "chain.yaml"
    recipe.write_text(yaml.safe_dump(_chain_recipe({"method": "pela"}, {"method": "afm", "targets": BLOCK_LINEARS})))
    result = run_cli("apply", "--recipe", recipe, transformer_model, "--out", tmp_path / "out", "-q")
    assert result.exit_code == 2 and "afm cannot continue from pela" in result.output
    assert not (tmp_path / "out").exists()
