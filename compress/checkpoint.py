"""Loading and saving models, safely by default.

`apply` also writes a self-describing artifact beside `model.pt`: `model.safetensors` (weights)
and `compression.json` (format, version, the original factory and kwargs, the structural edits,
the inputs). `load(folder)` rebuilds the compressed model from those two files alone.

The safe checkpoint is a dict readable with `torch.load(weights_only=True)`:

    {"format": "compress.checkpoint", "version": 1,
     "factory": "package.module:callable", "kwargs": {...},   # how to build the original model
     "edits": [{"op": "factorize", "name": ..., "rank": ..., "scheme": ...}, ...],
     "state_dict": {...}, "inputs": [{"name", "shape", "dtype"}], "metadata": {...}}

Loading it imports the factory, builds the model, replays the structural edits (so a compressed
model reloads without unpickling anything) and loads the weights. A `.safetensors` state dict
works the same way with the factory named in the recipe. A whole pickled module
(`torch.save(model)`) is loaded only when the user trusts it, because unpickling runs code.
"""
from __future__ import annotations

import importlib
import json
import os
import pickle
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import layers
from .errors import UserError, first_line
from .methods.base import replace_module

FORMAT = "compress.checkpoint"
VERSION = 1
ARTIFACT_FORMAT = "compress.artifact"
ARTIFACT_VERSION = 1
ARTIFACT_NAME = "compression.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class LoadedModel:
    model: nn.Module
    path: str
    factory: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)
    inputs: list[dict] | None = None
    edits: list[dict] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def pickled(self) -> bool:
        return self.factory is None


def import_factory(reference: str):
    """The callable named by 'package.module:callable'."""
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"factory {reference!r}: expected 'package.module:callable'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"factory {reference!r}: cannot import {module_name!r} ({exc})") from None
    try:
        target = module
        for part in attr.split("."):
            target = getattr(target, part)
    except AttributeError:
        raise UserError(f"factory {reference!r}: module {module_name!r} has no attribute {attr!r}") from None
    if not callable(target):
        raise UserError(f"factory {reference!r}: {attr!r} is not callable")
    return target


def build_model(factory: str, kwargs: dict[str, Any]) -> nn.Module:
    try:
        model = import_factory(factory)(**kwargs)
    except UserError:
        raise
    except TypeError as exc:
        raise UserError(f"factory {factory!r}: does not accept kwargs {sorted(kwargs)} ({exc})") from None
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {factory!r}: returned {type(model).__name__}, not an nn.Module")
    return model


def apply_edits(model: nn.Module, edits: list[dict], inputs: list[dict] | None = None) -> None:
    """Replay structural edits on a freshly built model (weights are loaded afterwards).
    Channel removals trace the model on a sample built from `inputs` (the checkpoint's input list)."""
    for edit in edits:
        op = edit.get("op") if isinstance(edit, dict) else None
        if op not in ("factorize", "prune_channels"):
            raise UserError(f"structural edit {edit!r} is not known to this version of compress")
        try:
            if op == "factorize":
                layer = model.get_submodule(edit["name"])
                replace_module(model, edit["name"], layers.empty_factorized(layer, int(edit["rank"]), edit["scheme"],
                                                                            edit.get("bias")))
            elif edit["idxs"]:
                _remove_channels(model, edit["root"], [int(i) for i in edit["idxs"]], inputs)
        except (KeyError, AttributeError, TypeError, ValueError, IndexError) as exc:
            raise UserError(f"structural edit {edit!r} does not fit the model built by the factory ({exc})") from None


def _remove_channels(model: nn.Module, root: str, idxs: list[int], inputs: list[dict] | None) -> None:
    import torch_pruning as tp

    from .data import synthetic_sample

    if not inputs:
        raise UserError("the checkpoint removes channels but does not describe the model's inputs")
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=synthetic_sample(inputs))
    module = model.get_submodule(root)
    handler = tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else tp.prune_linear_out_channels
    graph.get_pruning_group(module, handler, idxs=idxs).prune()


def load_state(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Load weights strictly; a mismatch names the first missing and unexpected keys."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {missing[0]!r}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else ""))
        if unexpected:
            parts.append(f"unexpected {unexpected[0]!r}" + (f" (+{len(unexpected) - 1} more)" if len(unexpected) > 1 else ""))
        raise UserError(f"{source}: weights do not fit the model: {'; '.join(parts)}")
    for k, v in state_dict.items():
        if expected[k].shape != v.shape:
            raise UserError(f"{source}: weight {k!r} has shape {list(v.shape)}, the model expects {list(expected[k].shape)}")
    model.load_state_dict(state_dict)


def load_model(path: str | Path, factory: str | None = None, kwargs: dict | None = None,
               trust: bool = False) -> LoadedModel:
    """Load a model from a safe checkpoint, a safetensors/state-dict file plus `factory`, or
    (with `trust`) a whole pickled module."""
    path = Path(path)
    source = str(path)
    if path.is_dir() and (path / ARTIFACT_NAME).is_file():
        return load_artifact(path / ARTIFACT_NAME)
    if not path.is_file():
        raise UserError(f"{source}: model file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{source}: model file is empty")
    if path.suffix.lower() == ".json":
        return load_artifact(path)
    if path.suffix.lower() == ".safetensors":
        return _from_state_dict(_read_safetensors(path), source, factory, kwargs or {})
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights_only" not in str(exc).lower() and "weights only" not in str(exc).lower():
            raise UserError(f"{source}: not a readable checkpoint ({first_line(exc)})") from None
        if not trust:
            raise UserError(f"{source}: holds pickled Python objects (e.g. a whole torch.save(model)); "
                            "unpickling runs code, so pass --trust-checkpoint if you trust its source") from None
        return _from_pickle(source)
    except Exception as exc:  # the weights-only unpickler runs no code; any failure means a bad file
        raise UserError(f"{source}: not a readable checkpoint, truncated or not made by torch.save "
                        f"({first_line(exc)})") from None
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_safe_checkpoint(obj, source)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_state_dict(obj, source, factory, kwargs or {})
    raise UserError(f"{source}: not a model checkpoint (expected a compress checkpoint, a state dict with "
                    f"model.factory in the recipe, or a pickled module; found {type(obj).__name__})")


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file():
        raise UserError(f"{path}: weights file not found")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({first_line(exc)})") from None


def save_artifact(folder: Path, model: nn.Module, factory: str, kwargs: dict[str, Any], edits: list[dict],
                  inputs: list[dict] | None, metadata: dict[str, Any] | None = None) -> None:
    """Write `model.safetensors` (weights) and `compression.json` (how to rebuild the structure):
    the self-describing artifact that reloads without unpickling anything."""
    from safetensors.torch import save_file

    # safetensors refuses tensors that share memory; a state dict is saved as independent copies
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    save_file(state, str(folder / WEIGHTS_NAME), metadata={"format": ARTIFACT_FORMAT})
    description = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "factory": factory, "kwargs": kwargs,
                   "edits": edits, "inputs": inputs, "weights": WEIGHTS_NAME, "metadata": metadata or {}}
    (folder / ARTIFACT_NAME).write_text(json.dumps(description, indent=2) + "\n")


def load_artifact(path: Path) -> LoadedModel:
    """Rebuild a compressed model from `compression.json` and the weights file it names."""
    source = str(path)
    try:
        description = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{source}: not a readable compression.json ({first_line(exc)})") from None
    if not isinstance(description, dict) or description.get("format") != ARTIFACT_FORMAT:
        raise UserError(f"{source}: not a compress artifact description (no \"format\": \"{ARTIFACT_FORMAT}\")")
    version = description.get("version")
    if version != ARTIFACT_VERSION:
        raise UserError(f"{source}: artifact format version {version!r} is not supported "
                        f"(this compress reads version {ARTIFACT_VERSION}); upgrade compress")
    for key in ("factory", "edits"):
        if key not in description:
            raise UserError(f"{source}: missing key {key!r}")
    model = build_model(description["factory"], description.get("kwargs") or {})
    apply_edits(model, description["edits"], description.get("inputs"))
    weights = path.parent / description.get("weights", WEIGHTS_NAME)
    load_state(model, _read_safetensors(weights), str(weights))
    return LoadedModel(model.eval(), source, description["factory"], description.get("kwargs") or {},
                       description.get("inputs"), list(description["edits"]), description.get("metadata") or {})


def load(path: str | Path, trust_checkpoint: bool = False) -> nn.Module:
    """The model in a checkpoint, an artifact folder (compression.json + model.safetensors) or a
    compression.json, in eval mode."""
    return load_model(path, trust=trust_checkpoint).model


def _from_safe_checkpoint(obj: dict, source: str) -> LoadedModel:
    version = obj.get("version")
    if version != VERSION:
        raise UserError(f"{source}: checkpoint format version {version!r} is not supported "
                        f"(this compress reads version {VERSION}); upgrade compress")
    model = build_model(obj["factory"], obj.get("kwargs", {}))
    apply_edits(model, obj.get("edits", []), obj.get("inputs"))
    load_state(model, obj["state_dict"], source)
    return LoadedModel(model.eval(), source, obj["factory"], obj.get("kwargs", {}), obj.get("inputs"),
                       list(obj.get("edits", [])), obj.get("metadata", {}))


def _from_state_dict(state: dict, source: str, factory: str | None, kwargs: dict) -> LoadedModel:
    if factory is None:
        raise UserError(f"{source}: a bare state dict does not say how to build the model; "
                        "name it in the recipe as model.factory ('package.module:callable')")
    model = build_model(factory, kwargs)
    load_state(model, state, source)
    return LoadedModel(model.eval(), source, factory, kwargs)


def _from_pickle(source: str) -> LoadedModel:
    try:
        obj = torch.load(source, map_location="cpu", weights_only=False)
    except Exception as exc:  # unpickling can fail in arbitrary user code
        raise UserError(f"{source}: cannot unpickle ({type(exc).__name__}: {first_line(exc)})") from None
    if not isinstance(obj, nn.Module):
        raise UserError(f"{source}: the pickle holds a {type(obj).__name__}, not an nn.Module")
    return LoadedModel(obj.eval(), source)


def save_checkpoint(path: str | Path, model: nn.Module, factory: str, kwargs: dict[str, Any], *,
                    inputs: list[dict] | None = None, edits: list[dict] | None = None,
                    metadata: dict[str, Any] | None = None) -> None:
    """Write the safe checkpoint format, atomically (temporary file renamed into place)."""
    payload = {
        "format": FORMAT, "version": VERSION, "factory": factory, "kwargs": dict(kwargs),
        "edits": list(edits or []), "inputs": inputs, "metadata": dict(metadata or {}),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
    }
    _atomic_save(payload, Path(path))


def save_pickled_module(path: str | Path, model: nn.Module) -> None:
    """Whole-module pickle, for models that came without a factory (reload needs --trust-checkpoint)."""
    _atomic_save(model, Path(path))


def current_umask() -> int:
    """The process umask (reading it means setting it, so set it straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes it private; a checkpoint is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
