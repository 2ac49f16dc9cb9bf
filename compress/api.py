"""The Python API: the command line is a thin layer over these.

    import compress
    plan = compress.plan(model, "recipes/svd.yaml")                  # per-layer decisions, no training
    result = compress.apply(model, recipe_dict, data={"train": {"image": x, "target": y}})
    result.model                                                      # the compressed nn.Module, in memory
    report = compress.export(result, "out/svd")                       # ONNX, checks, latency, report
    again = compress.load("out/svd")                                  # rebuilt from the files alone

`model` is an `nn.Module` in memory or a checkpoint file/folder; `recipe` a path, a YAML string, a
dict, a `Recipe` or a loaded recipe; `data` maps roles (train, calibration, eval) to data in memory
(a dict of tensors or a `Dataset`) or files, over the recipe's own sources. Nothing is written
until `export`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import RecipeError, UserError
from .pipeline import Compressed, Context, Options, compress_model, load_context, plan as plan_layers, resolve_device, write
from .recipe import SEED_MAX, LoadedRecipe, Recipe, format_errors, load_recipe, parse_recipe
from .trust import check_trust_flag, trusted_prefixes


@dataclass
class Result:
    """What `apply` returns: the compressed model in memory, its decisions and training summary."""

    model: nn.Module
    decisions: list[dict]
    finetune: dict | None
    post_finetune: dict | None
    context: Context
    compressed: Compressed


def as_recipe(recipe: Any) -> LoadedRecipe:
    """A recipe from a path, a YAML string, a dict, a Recipe or a LoadedRecipe."""
    import hashlib

    from pydantic import ValidationError

    if isinstance(recipe, LoadedRecipe):
        return recipe
    if isinstance(recipe, Recipe):
        text = recipe.model_dump_json(by_alias=True)
        return LoadedRecipe(recipe, None, hashlib.sha256(text.encode()).hexdigest())
    if isinstance(recipe, dict):
        try:
            validated = Recipe.model_validate(copy.deepcopy(recipe))
        except ValidationError as exc:
            raise RecipeError("recipe: " + format_errors(exc)) from None
        return as_recipe(validated)
    if isinstance(recipe, Path) or (isinstance(recipe, str) and "\n" not in recipe
                                    and recipe.strip().endswith((".yaml", ".yml"))):
        return load_recipe(recipe)
    if isinstance(recipe, (str, bytes)):
        raw = recipe.encode() if isinstance(recipe, str) else recipe
        return LoadedRecipe(parse_recipe(raw), None, hashlib.sha256(raw).hexdigest())
    raise RecipeError(f"recipe: expected a path, YAML text, a dict or a Recipe, not {type(recipe).__name__}")


def _context(model, recipe, data, trust_checkpoint, trust_factories, **options) -> tuple[Context, Options]:
    opts = Options(trust_checkpoint=check_trust_flag(trust_checkpoint),
                   trust_factories=trusted_prefixes(trust_factories), **options)
    return load_context(as_recipe(recipe), model, opts, data), opts


def plan(model, recipe, *, data: dict | None = None, trust_checkpoint: bool = False,
         trust_factories=()) -> list[dict]:
    """The per-layer decisions the recipe would make on the model (calibration included, no training)."""
    ctx, _ = _context(model, recipe, data, trust_checkpoint, trust_factories, progress=False)
    return plan_layers(ctx).rows


def apply(model, recipe, *, data: dict | None = None, seed: int | None = None, device: str = "cpu",
          progress: bool = False, trust_checkpoint: bool = False, trust_factories=()) -> Result:
    """Compress the model by the recipe, in memory: plan, prepare, fine-tune, finalize. Writes nothing;
    the original model is left unchanged."""
    if seed is not None and (type(seed) is not int or not 0 <= seed <= SEED_MAX):
        raise UserError(f"seed: expected an integer from 0 to {SEED_MAX}, not {seed!r:.40}")
    if isinstance(model, nn.Module):
        model = copy.deepcopy(model)  # the caller's model stays as it was
    ctx, opts = _context(model, recipe, data, trust_checkpoint, trust_factories, seed=seed, device=device,
                         progress=progress)
    r = ctx.recipe.recipe
    seed = r.seed if seed is None else seed
    torch.manual_seed(seed)
    done = compress_model(ctx, opts, seed, resolve_device(device))
    return Result(done.model, done.decisions, done.finetune, done.post_finetune, ctx, done)


def export(result: Result, out: str | Path, *, force: bool = False, progress: bool = False):
    """Write `result` into the folder `out` as `compress apply` does (model.pt, compression.json and
    model.safetensors when the model has a factory, model.onnx verified against torch, latency,
    report.json, report.md); the typed report. `force` replaces only a previous output."""
    return write(result.context, result.compressed, Path(out), Options(progress=progress), force)
