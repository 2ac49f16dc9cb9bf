import json

import pytest
import torch
import yaml

from compress.errors import RecipeError
from compress.recipe import json_schema, load_recipe, parse_recipe

from .conftest import REPO


def error_of(text: str) -> str:
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def test_minimal_recipe_gets_defaults():
    recipe = parse_recipe("stages: [{method: svd}]")
    s = torch.tensor([3.0, 1.0, 1.0, 0.5])  # squares 9, 1, 1, 0.25: 90% needs three
    assert recipe.stages[0].choose_rank(s, 4, 4) == 3
    assert recipe.finetune.epochs == 0
    assert recipe.bench.batch_sizes == [1, 32]


def test_yaml_syntax_error_names_line_and_column():
    message = error_of("stages:\n  - method: svd\n    energy: [0.9\n")
    assert message.startswith("r.yaml:4:1: YAML syntax error")


def test_unknown_key_suggests_the_right_one():
    assert error_of("stages: [{method: svd, energyy: 0.9}]") == "r.yaml: stages[0].energyy: unknown key; did you mean 'energy'?"
    assert "finetune.lrr: unknown key; did you mean 'lr'?" in error_of("finetune: {lrr: 1}\nstages: [{method: svd}]")
    assert "stages[0].targets.includ: unknown key; did you mean 'include'?" in error_of(
        "stages: [{method: svd, targets: {includ: [a]}}]")


def test_wrong_type_and_out_of_range_name_the_key():
    assert "finetune.epochs: Input should be a valid integer" in error_of("finetune: {epochs: many}\nstages: [{method: svd}]")
    assert "stages[0].energy: Input should be less than or equal to 1 (got 2)" in error_of("stages: [{method: svd, energy: 2}]")
    assert "bench.runs: Input should be greater than 0" in error_of("bench: {runs: 0}\nstages: [{method: svd}]")


def test_unknown_method_and_missing_pieces():
    assert "stages[0].method: unknown method 'trpp'; available: svd" in error_of("stages: [{method: trpp}]")
    assert "stages: required key is missing" in error_of("name: x")
    assert "is empty" in error_of("")
    assert "give one of rank, ratio, energy" in error_of("stages: [{method: svd, rank: 2, ratio: 0.5}]")


def test_missing_recipe_file(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "recipes").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_are_valid(path):
    import hashlib

    loaded = load_recipe(path)
    recipe = loaded.recipe
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()  # the report's provenance
    # a shipped recipe reads like documentation and holds a CI job to account
    assert recipe.name and recipe.description and recipe.data.eval and recipe.gates.max_metric_drop is not None
    # and every key it sets is one the schema knows, at the value it says (nothing silently dropped)
    document = yaml.safe_load(path.read_text())
    dumped = recipe.model_dump(by_alias=True, exclude_unset=True)
    assert set(document) == set(dumped)
    assert [s["method"] for s in document["stages"]] == [s.method for s in recipe.stages]


def test_json_schema_describes_stages():
    schema = json_schema()
    assert "stages" in schema["required"]
    json.dumps(schema)
    assert "SvdStage" in json.dumps(schema)
