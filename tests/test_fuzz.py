"""Property-based tests: the recipe loader only ever raises clean recipe errors, and the
factorization math holds on random shapes."""
import copy

import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from compress import layers, linalg
from compress.errors import RecipeError
from compress.recipe import parse_recipe

from .conftest import REPO

SHIPPED = {p.name: yaml.safe_load(p.read_text()) for p in sorted((REPO / "recipes").glob("*.yaml"))}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12))
keys = st.one_of(st.sampled_from(["stages", "method", "svd", "trp", "data", "finetune", "targets", "include",
                                  "energy", "rank", "ratio", "lambda", "nuclear", "bench", "gates", "export"]),
                 st.text(max_size=8))
documents = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                          st.dictionaries(keys, inner, max_size=5)), max_leaves=20)


def _parse_cleanly(text):
    try:
        parse_recipe(text, "fuzz.yaml")
    except RecipeError as exc:
        assert str(exc).startswith("fuzz.yaml") and "\n" not in str(exc)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_random_yaml_documents_give_clean_errors(document):
    _parse_cleanly(yaml.safe_dump(document))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_give_clean_errors(raw):
    _parse_cleanly(raw)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, prefix + (i,))


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(sorted(SHIPPED)), st.data())
def test_mutated_shipped_recipes_give_clean_errors(name, data):
    document = copy.deepcopy(SHIPPED[name])
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(document) if p]
        if not paths:
            break
        path = data.draw(st.sampled_from(paths))
        parent = document
        for part in path[:-1]:
            parent = parent[part]
        action = data.draw(st.sampled_from(["delete", "replace", "add"]))
        if action == "delete":
            del parent[path[-1]]
        elif action == "replace":
            parent[path[-1]] = data.draw(documents)
        elif isinstance(parent, dict):
            parent[data.draw(keys)] = data.draw(scalars)
    _parse_cleanly(yaml.safe_dump(document))


@settings(max_examples=60, deadline=None)
@given(
    scheme=st.sampled_from(layers.SCHEMES),
    c=st.integers(1, 6), n=st.integers(1, 6), kh=st.integers(1, 4), kw=st.integers(1, 4),
    sh=st.integers(1, 3), sw=st.integers(1, 3), ph=st.integers(0, 3), pw=st.integers(0, 3),
    dh=st.integers(1, 2), dw=st.integers(1, 2), bias=st.booleans(),
)
def test_full_rank_conv_factorization_is_exact_on_random_geometry(scheme, c, n, kh, kw, sh, sw, ph, pw, dh, dw, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(c, n, (kh, kw), stride=(sh, sw), padding=(ph, pw), dilation=(dh, dw), bias=bias).double()
    height, width = dh * (kh - 1) + 1 + 4, dw * (kw - 1) + 1 + 3
    x = torch.randn(2, c, height, width, dtype=torch.float64)
    full = min(layers.conv_matrix(conv.weight, scheme).shape)
    fact = layers.factorize(conv, full, scheme)
    with torch.no_grad():
        assert torch.allclose(fact(x), conv(x), atol=1e-9)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.0, 100.0), min_size=1, max_size=30), st.floats(0.01, 1.0), st.floats(0.01, 1.0))
def test_energy_rank_is_monotone_in_energy(values, e1, e2):
    s = torch.tensor(sorted(values, reverse=True), dtype=torch.float64)
    low, high = sorted((e1, e2))
    assert 1 <= linalg.energy_rank(s, low) <= linalg.energy_rank(s, high) <= len(values)
