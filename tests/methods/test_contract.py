"""One contract for every registered method, told nothing about any of them: what the plan says
is what gets built, and what gets built reloads from its files alone with the same outputs
(the edits replay). And for budgets: the ratio planned is the ratio built, for every size target
and both conv schemes."""
import pytest
import torch

import compress
from compress import bench
from compress.api import as_recipe
from compress.methods import METHODS
from compress.pipeline import Options, load_context, plan, planned_cost

DATA = {"train": "bundled:digits/train", "calibration": "bundled:digits/calibration", "eval": "bundled:digits/test",
        "batch_size": 64}
BENCH = {"batch_sizes": [1], "runs": 3, "warmup": 1, "baselines": []}
STAGES = {  # a stage that changes something on the digits ResNet; a method not listed runs with its defaults
    "svd": {"ratio": 0.3}, "afm": {"ratio": 0.3}, "pela": {"ratio": 0.3}, "trp": {"energy": 0.5},
    "group_envelope": {"keep": 0.5},
}


def recipe(stage: dict, **extra) -> dict:
    return {"data": DATA, "stages": [stage], "finetune": {"steps": 2}, "bench": BENCH, **extra}


def planned(model_path, document):
    ctx = load_context(as_recipe(document), model_path, Options())
    planned = plan(ctx)
    model = ctx.loaded.model
    return planned.cost(bench.count_params(model), bench.count_macs(model, ctx.sample)), ctx, planned.rows


@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_builds_what_it_decides_and_reloads_the_same(name, digits_model, tmp_path):
    document = recipe({"method": name, **STAGES.get(name, {})})
    _, ctx, rows = planned(digits_model, document)
    assert any(r["action"] != "keep" for r in rows), f"{name}: the contract stage changes nothing"
    result = compress.apply(digits_model, document)
    built = result.model.eval()
    decided = planned_cost(result.compressed.methods, result.decisions, bench.count_params(ctx.loaded.model),
                           bench.count_macs(ctx.loaded.model, ctx.sample))
    measured = (bench.count_params(built), bench.count_macs(built, ctx.sample))
    assert decided == measured, (name, decided, measured)  # the final decisions, as the report shows them
    compress.export(result, tmp_path / "out")
    again = compress.load(tmp_path / "out").eval()
    batch = next(iter(ctx.data["eval"].batches(64)))
    with torch.no_grad():
        assert torch.allclose(again(batch["image"]), built(batch["image"]), atol=1e-5)
    assert (bench.count_params(again), bench.count_macs(again, ctx.sample)) == measured


@pytest.mark.parametrize("target,stage", [
    ("params", {"method": "svd", "scheme": "spatial"}), ("params", {"method": "svd", "scheme": "channel"}),
    ("macs", {"method": "svd", "scheme": "spatial"}), ("macs", {"method": "svd", "scheme": "channel"}),
    ("params", {"method": "afm", "targets": {"types": ["Conv2d", "Linear"]}}),
    ("params", {"method": "group_envelope", "keep": "auto"}),
])
@pytest.mark.parametrize("value", [2.0, 3.0])
def test_the_ratio_a_budget_plans_is_the_ratio_built(target, stage, value, digits_model):
    if stage["method"] == "group_envelope" and value == 3.0:
        value = 1.5  # most of the digits ResNet's parameters sit in layers whose channels are coupled
    stage = {**stage, "targets": stage.get("targets", {"types": ["Conv2d"], "include": ["layer*"],
                                                      "exclude": ["*.shortcut.*"]})}
    document = recipe(stage, budget={target: value, "probes": 1})
    (params, macs), ctx, _ = planned(digits_model, document)
    built = compress.apply(digits_model, document).model
    assert (params, macs) == (bench.count_params(built), bench.count_macs(built, ctx.sample))
    original = bench.count_params(ctx.loaded.model) if target == "params" else bench.count_macs(ctx.loaded.model,
                                                                                                   ctx.sample)
    assert original / (params if target == "params" else macs) >= value


@pytest.mark.parametrize("name", sorted(METHODS))
def test_a_method_declares_everything_its_calibration_sets(name, digits_model):
    """A sweep hands the declared calibration state to its later runs instead of calibrating again;
    an attribute calibrate sets but does not declare would be silently missing there."""
    from compress.pipeline import make_methods
    from compress.data import split_batch

    document = recipe({"method": name, **STAGES.get(name, {}), **({"init": "afm"} if name == "pela" else {})})
    ctx = load_context(as_recipe(document), digits_model, Options())
    method = make_methods(ctx.recipe, ctx.output["kind"])[0]
    if not method.needs_calibration:
        assert not method.calibration_state
        return
    before = dict(method.__dict__)

    def batches():
        for batch in ctx.data["calibration"].batches(64):
            yield split_batch(batch, ctx.input_names, ctx.target)[0]

    method.calibrate(ctx.loaded.model, batches)
    changed = {k for k, v in method.__dict__.items() if k not in before or before[k] is not v}
    assert changed and changed <= set(method.calibration_state), (name, changed, method.calibration_state)


def test_a_decision_outside_the_closed_set_of_actions_is_refused(digits_model):
    """The report's readers know five actions; a method (a plug-in, say) that decides anything else
    is stopped at planning, naming itself."""
    from compress.methods import ACTIONS, Decision
    from compress.planning import plan_methods

    ctx = load_context(as_recipe(recipe({"method": "svd"})), digits_model, Options())
    method = make_methods_for(ctx)[0]
    odd = Decision("fc", method.name, "Linear", "shrink", [10, 64], 650, 640, 300, 300)
    method.plan = lambda model, profile: [odd]
    with pytest.raises(TypeError, match="'shrink'.*one of factorize"):
        plan_methods([method], ctx.loaded.model, {})
    assert "shrink" not in ACTIONS


def make_methods_for(ctx):
    from compress.pipeline import make_methods

    return make_methods(ctx.recipe, ctx.output["kind"])
