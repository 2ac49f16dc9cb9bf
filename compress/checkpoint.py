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

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .data import sample_size_error
from .errors import UserError, first_line
from . import hf
from .files import FileRefused, check_zip, loads_json, read_regular, zip_names
from .methods.base import short
from . import outdir
from .trust import build_model, check_trust_flag, trusted_prefixes

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
    tokenizer: str | None = None  # a folder holding the model's tokenizer files (a Hugging Face model)

    @property
    def pickled(self) -> bool:
        return self.factory is None


MAX_EDITS = 100_000
MAX_DESCRIPTION_BYTES = 64 << 20  # a compression.json larger than this is not one of ours
INPUT_DTYPES = ("float32", "float64", "float16", "int64", "int32", "bool")


def apply_edits(model: nn.Module, edits: Any, inputs: list[dict] | None = None) -> None:
    """Replay structural edits on a freshly built model (weights are loaded afterwards). Each kind is
    registered by the method that makes it (methods.base.register_edit); every edit is checked
    against the model before anything is allocated (names, ranks and channel indices in range)."""
    from .methods import EDITS

    if not isinstance(edits, list) or len(edits) > MAX_EDITS:
        raise UserError(f"structural edits must be a list (of at most {MAX_EDITS:,}), not {type(edits).__name__}")
    for edit in edits:
        kind = EDITS.get(edit.get("op")) if isinstance(edit, dict) and isinstance(edit.get("op"), str) else None
        if kind is None:
            raise UserError(f"structural edit {short(edit)} is not known to this version of compress")
        checked = kind.check(model, edit)
        try:
            kind.apply(model, checked, inputs)
        except UserError:
            raise
        except Exception as exc:  # e.g. torch-pruning's tracing, on a model that does not fit the edit
            raise UserError(f"structural edit {short(edit)} does not fit the model built by the factory "
                            f"({type(exc).__name__}: {first_line(exc)})") from None


def check_inputs(inputs: Any, source: str) -> list[dict] | None:
    """The input description of a checkpoint or artifact, checked: names, dtypes, bounded shapes."""
    if inputs is None:
        return None
    if not isinstance(inputs, list) or not 0 < len(inputs) <= 64:
        raise UserError(f"{source}: 'inputs' must be a list of 1 to 64 input descriptions")
    for spec in inputs:
        shape = spec.get("shape") if isinstance(spec, dict) else None
        ok = (isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"]
              and spec.get("dtype", "float32") in INPUT_DTYPES and isinstance(shape, list) and len(shape) <= 8
              and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape))
        if not ok:
            raise UserError(f"{source}: input description {short(spec)} is not valid (name, shape of positive "
                            f"integers, dtype one of {', '.join(INPUT_DTYPES)})")
        error = sample_size_error(spec["name"], shape)
        if error:
            raise UserError(f"{source}: {error}")
    return inputs


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
               trust: bool = False, trusted: tuple[str, ...] | None = None, task: str | None = None,
               output: str | None = None) -> LoadedModel:
    """Load a model from a safe checkpoint, a safetensors/state-dict file plus `factory`, a Hugging
    Face model folder (built for `task`, measured at `output`, see compress.hf), or (with `trust`)
    a whole pickled module. Factories are resolved only under the `trusted` module prefixes
    (default: the tool's own examples; see compress.trust)."""
    trusted = trusted_prefixes() if trusted is None else trusted
    path = Path(path)
    source = str(path)
    folder = path.is_dir() and hf.is_model_folder(path) and not (path / ARTIFACT_NAME).is_file()
    if (task or output) and not folder:
        raise UserError(f"{source}: model.task and model.output are for a Hugging Face model folder (config.json and "
                        "safetensors weights); this is not one")
    tokenizer = str(path) if path.is_dir() and hf.has_tokenizer(path) else None  # beside a folder's model
    if path.is_dir() and (path / ARTIFACT_NAME).is_file():
        loaded = load_artifact(path / ARTIFACT_NAME, trusted)
        loaded.tokenizer = tokenizer
        return loaded
    if folder:
        model, hf_kwargs, metadata = hf.load_folder(path, task, output)
        return LoadedModel(model, source, hf.FACTORY, hf_kwargs, hf.input_specs(hf.tokenizer_input_names(path)),
                           metadata=metadata, tokenizer=tokenizer)
    if path.is_dir():
        raise UserError(f"{source}: a folder, but neither a compress output (compression.json) nor a Hugging Face "
                        "model folder (config.json)")
    if not path.is_file():
        raise UserError(f"{source}: model file not found")
    if path.stat().st_size == 0:
        raise UserError(f"{source}: model file is empty")
    if path.suffix.lower() == ".json":
        return load_artifact(path, trusted)
    if path.suffix.lower() == ".safetensors":
        return _from_state_dict(_read_safetensors(path), source, factory, kwargs or {}, trusted)
    if any(m.endswith("/constants.pkl") or "/code/__torch__/" in m for m in zip_names(path)):
        raise UserError(f"{source}: is a TorchScript archive (torch.jit.save); compress rewrites a model's modules, "
                        "which a scripted model cannot have done to it: save the eager model's state_dict, or "
                        "the module itself with torch.save, instead")
    try:
        check_zip(path)
    except FileRefused as exc:
        raise UserError(f"{source}: not a usable checkpoint: {exc}") from None
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except Exception as exc:  # the weights-only unpickler runs no code; any failure means a bad or untrusted file
        if not _holds_pickled_objects(path):
            raise UserError(f"{source}: not a checkpoint (not a file written by torch.save, or truncated: "
                            f"{first_line(exc, 100)})") from None
        if not trust:
            raise UserError(f"{source}: holds pickled Python objects (e.g. a whole torch.save(model)); "
                            "unpickling runs code, so pass --trust-checkpoint if you trust its source") from None
        return _from_pickle(source)
    if isinstance(obj, dict) and obj.get("format") == FORMAT:
        return _from_safe_checkpoint(obj, source, trusted)
    if isinstance(obj, dict) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return _from_state_dict(obj, source, factory, kwargs or {}, trusted)
    raise UserError(f"{source}: not a model checkpoint (expected a compress checkpoint, a state dict with "
                    f"model.factory in the recipe, or a pickled module; found {type(obj).__name__})")


MAX_PICKLE_SCAN = 64 << 20


def _holds_pickled_objects(path: Path) -> bool:
    """Whether a file the weights-only loader refused is a well-formed torch.save file that
    references Python objects (a pickled module), as opposed to random or truncated bytes.
    Parses the pickle's opcodes without executing any of them."""
    import pickletools

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next((i for i in archive.infolist() if i.filename.endswith("data.pkl")), None)
                if member is None or member.file_size > MAX_PICKLE_SCAN:
                    return False
                data = archive.read(member)
        else:
            if path.stat().st_size > MAX_PICKLE_SCAN:
                return False
            data = path.read_bytes()
        ops = {op.name for op, _, _ in pickletools.genops(data)}
    except Exception:  # a malformed archive or pickle: not a pickled object, just a bad file
        return False
    return bool(ops & {"GLOBAL", "STACK_GLOBAL", "INST", "OBJ", "REDUCE"})


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
    os.chmod(folder / WEIGHTS_NAME, 0o666 & ~outdir.current_umask())  # safetensors writes it private; it is an ordinary file
    description = {"format": ARTIFACT_FORMAT, "version": ARTIFACT_VERSION, "factory": factory, "kwargs": kwargs,
                   "edits": edits, "inputs": inputs, "weights": WEIGHTS_NAME, "metadata": metadata or {}}
    (folder / ARTIFACT_NAME).write_text(json.dumps(description, indent=2) + "\n")


def load_artifact(path: Path, trusted: tuple[str, ...] | None = None) -> LoadedModel:
    """Rebuild a compressed model from `compression.json` and the weights file it names."""
    source = str(path)
    try:
        if path.stat().st_size > MAX_DESCRIPTION_BYTES:  # MAX_EDITS edits of a few hundred bytes fit easily
            raise UserError(f"{source}: {path.stat().st_size:,} bytes is not a compression.json (at most "
                            f"{MAX_DESCRIPTION_BYTES:,}); refusing to read it")
        description = loads_json(read_regular(path, MAX_DESCRIPTION_BYTES))
    except FileRefused as exc:
        raise UserError(f"{source}: not a compression.json to read: {exc}") from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UserError(f"{source}: not a readable compression.json ({first_line(exc)})") from None
    if not isinstance(description, dict) or description.get("format") != ARTIFACT_FORMAT:
        raise UserError(f"{source}: not a compress artifact description (no \"format\": \"{ARTIFACT_FORMAT}\")")
    version = description.get("version")
    if type(version) is not int or version != ARTIFACT_VERSION:  # true and 1.0 equal 1, and are not versions
        raise UserError(f"{source}: artifact format version {version!r} is not supported "
                        f"(this compress reads version {ARTIFACT_VERSION}); upgrade compress")
    for key in ("factory", "edits"):
        if key not in description:
            raise UserError(f"{source}: missing key {key!r}")
    inputs = check_inputs(description.get("inputs"), source)
    model = build_model(description["factory"], description.get("kwargs") or {},
                        trusted_prefixes() if trusted is None else trusted)
    apply_edits(model, description["edits"], inputs)
    weights_name = description.get("weights", WEIGHTS_NAME)
    if not isinstance(weights_name, str) or Path(weights_name).name != weights_name or weights_name in ("", ".", ".."):
        raise UserError(f"{source}: \"weights\" must name a file beside it, got {short(weights_name)}")
    weights = path.parent / weights_name
    load_state(model, _read_safetensors(weights), str(weights))
    metadata = description.get("metadata")
    return LoadedModel(model.eval(), source, description["factory"], description.get("kwargs") or {},
                       inputs, list(description["edits"]), metadata if isinstance(metadata, dict) else {})


def load(path: str | Path, trust_checkpoint: bool = False, trust_factories: list[str] | tuple[str, ...] = ()) -> nn.Module:
    """The model in a checkpoint, an artifact folder (compression.json + model.safetensors) or a
    compression.json, in eval mode. Factories other than the bundled examples' are built only under the
    module prefixes in `trust_factories`."""
    return load_model(path, trust=check_trust_flag(trust_checkpoint), trusted=trusted_prefixes(trust_factories)).model


def _from_safe_checkpoint(obj: dict, source: str, trusted: tuple[str, ...]) -> LoadedModel:
    version = obj.get("version")
    if type(version) is not int or version != VERSION:
        raise UserError(f"{source}: checkpoint format version {short(version)} is not supported "
                        f"(this compress reads version {VERSION}); upgrade compress")
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise UserError(f"{source}: 'state_dict' must map names to tensors")
    inputs = check_inputs(obj.get("inputs"), source)
    edits = obj.get("edits", [])
    kwargs = obj.get("kwargs") or {}
    model = build_model(obj.get("factory"), kwargs, trusted)
    apply_edits(model, edits, inputs)
    load_state(model, state, source)
    metadata = obj.get("metadata")
    return LoadedModel(model.eval(), source, obj["factory"], kwargs, inputs, list(edits),
                       metadata if isinstance(metadata, dict) else {})


def _from_state_dict(state: dict, source: str, factory: str | None, kwargs: dict,
                     trusted: tuple[str, ...]) -> LoadedModel:
    if factory is None:
        raise UserError(f"{source}: a bare state dict does not say how to build the model; "
                        "name it in the recipe as model.factory ('package.module:callable')")
    model = build_model(factory, kwargs, trusted)
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


def _atomic_save(obj: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    outdir.write_atomic(path, lambda f: torch.save(obj, f), public=True)
