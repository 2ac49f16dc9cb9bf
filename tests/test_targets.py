"""Target matching (methods/base.py): globs, regular expressions, types, and errors that help."""
import pytest
from torch import nn

from compress.errors import RecipeError
from compress.methods.base import Targets, pattern_matches, select_targets


def model():
    return nn.ModuleDict({"enc": nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), "head": nn.Linear(4, 2),
                          "conv": nn.Conv2d(1, 2, 3), "emb": nn.Embedding(5, 4)})


def names(targets, types=("Linear", "Conv2d")):
    return [n for n, _ in select_targets(model(), Targets.model_validate(targets), "stages[0].targets", types)]


def test_include_exclude_and_types():
    assert names({}) == ["enc.0", "enc.1", "head", "conv"]
    assert names({"include": ["enc.*"]}) == ["enc.0", "enc.1"]
    assert names({"exclude": ["head", "conv"]}) == ["enc.0", "enc.1"]
    assert names({"include": ["re:enc\\.[01]"], "exclude": ["re:.*1"]}) == ["enc.0"]
    assert names({"types": ["Embedding"]}) == ["emb"]  # types given: the method's default types do not apply
    assert names({}, ("Embedding",)) == ["emb"]


def test_patterns_that_match_nothing_or_do_not_compile():
    with pytest.raises(RecipeError, match=r"stages\[0\].targets.include\[0\]: pattern 'enc.9' matches no layer; "
                                          "close layer names: enc.1, enc.0"):
        names({"include": ["enc.9"]})
    with pytest.raises(RecipeError, match=r"exclude\[0\]: invalid regular expression"):
        names({"exclude": ["re:("]})
    matches = pattern_matches(model(), Targets.model_validate({"include": ["enc.*"], "exclude": ["*.1"]}), "t")
    assert {m.label: m.layers for m in matches} == {"include[0]": ["enc.0", "enc.1"], "exclude[0]": ["enc.1"]}
    assert [m.pattern for m in matches] == ["enc.*", "*.1"]
