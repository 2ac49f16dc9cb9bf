"""Which model factories may be imported and called, and what they may be called with.

A safe checkpoint, a `compression.json` and a recipe name the code that builds the model as
'package.module:callable'. Those files come from other people, so naming a callable must never be
enough to run it, and no file can widen what is trusted: trust comes only from the person running
the tool (`--trust-factory PREFIX`, or `trust_factories=` in Python). A factory is resolved only
when all of these hold, checked in this order:

1. It is on the allow-list *before anything is imported*: one of the bundled examples' model
   factories (`compress.examples.FACTORIES`, named exactly), a factory an installed distribution
   registers under the `compress.models` entry-point group (named exactly as registered), or a
   module under a prefix the user trusted (dot-separated, so `mypkg` trusts `mypkg.models` but not
   `mypkgevil`). No prefix of the standard library or of a package that loads code, pickles or
   files from its arguments (torch, compress, numpy, yaml, joblib, click, pandas, ...) can be
   trusted, whatever the flag: their functions are loaders, not models.
2. The attribute path is public names only (no `_private` or `__dunder__` hops) and passes through
   classes only, never through a module (`pkg:sub.fn` must be written `pkg.sub:fn`, so that the
   module named is the module checked).
3. The object is an `nn.Module` subclass, a classmethod of one (`BertModel.from_pretrained`), or a
   plain Python function, *defined* in a trusted module (its `__module__`), so `os:system`,
   `shutil:rmtree`, `builtins:exec`, or a trusted module's imported `torch.load`, can never be called.
4. The keyword arguments are JSON-like data (None, bool, int, finite float, str, lists, string-keyed
   dicts), bounded in depth and size, and no key at any depth (in any case or spelling) turns on
   code loading (`trust_remote_code`, `allow_pickle`, `weights_only: false`, ...).
5. The model is first built on PyTorch's `meta` device (no memory), and refused when its parameters
   and buffers would not fit in memory, so hostile kwargs (`width: 10**9`) cannot allocate
   without bound.
"""
from __future__ import annotations

import importlib
import inspect
import math
import re
import sys
from typing import Any, Iterable

import torch
from torch import nn

from .errors import UserError, first_line
from .system import available_memory

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PUBLIC = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MAX_KWARGS_DEPTH = 8
MAX_KWARGS_ITEMS = 10_000
MAX_STRING = 4096
ENTRY_POINT_GROUP = "compress.models"
# Python's own modules hold no models; trusting one of them would only open os.system and friends
_NEVER = frozenset(sys.stdlib_module_names) | {"builtins", "__main__", "importlib", "pickle", "subprocess"}

# packages whose functions load code, pickles or files named in their arguments, or dispatch to
# other callables (torch.hub.load, torch.load, numpy.load(allow_pickle=True), yaml.unsafe_load,
# joblib.load, click.edit, pandas.read_pickle, compress.checkpoint.load): never trusted, not even
# a part of them. The bundled examples' factories are trusted by their exact names instead.
LOADERS = frozenset({
    "torch", "torchvision", "torchaudio", "torchtext", "compress", "numpy", "scipy", "yaml", "ruamel",
    "joblib", "dill", "cloudpickle", "pickle5", "click", "typer", "pandas", "sklearn", "skops", "onnx",
    "onnxruntime", "safetensors", "h5py", "tables", "zarr", "fsspec", "jinja2", "mako", "pydantic",
    "setuptools", "pkg_resources", "pip", "_pytest", "pytest", "hypothesis", "IPython", "ipykernel",
    "tqdm", "torch_pruning", "sympy", "networkx", "matplotlib", "PIL", "cv2", "requests", "urllib3",
    "httpx", "fire", "hydra", "omegaconf", "lightning", "pytorch_lightning", "keras", "tensorflow",
    "jax", "flax", "huggingface_hub", "datasets", "accelerate", "mlflow", "wandb", "boto3", "paramiko",
    "fabric", "invoke", "sh", "plumbum", "pexpect", "psutil", "multiprocess", "pathos", "celery",
})


def check_prefix(prefix: Any, where: str = "--trust-factory") -> str:
    """A prefix the user wants to trust, validated: a dotted module name outside the standard library
    and outside the packages that load code from files."""
    if not isinstance(prefix, str) or not _MODULE.fullmatch(prefix):
        raise UserError(f"{where} {_short(prefix)}: expected a module name such as 'mypackage' or 'mypackage.models'")
    refusal = never_trusted(prefix)
    if refusal:
        raise UserError(f"{where} {prefix!r}: {refusal}; name the package that defines your model")
    return prefix


def never_trusted(module_name: str) -> str | None:
    """Why no flag can trust this module, or None."""
    top = module_name.split(".")[0]
    if top in _NEVER:
        return "Python's standard library holds no model factories and can never be trusted"
    if top in LOADERS:
        return (f"{top} has functions that load code, pickles or files named in their arguments, "
                "so it is never trusted, not even in part")
    return None


def trusted_prefixes(*groups: Iterable[str] | None) -> tuple[str, ...]:
    """The module prefixes of each group given (validated), without repeats. A bare string is one
    prefix, never a sequence of letters."""
    out: list[str] = []
    for group in groups:
        if group is None:
            continue
        if isinstance(group, str):
            group = (group,)
        elif not isinstance(group, (list, tuple, set, frozenset)):
            raise UserError(f"trust_factories: expected a list of module names, not {type(group).__name__}")
        for prefix in group:
            check_prefix(prefix, "trust_factories" if not isinstance(prefix, str) else "--trust-factory")
            if prefix not in out:
                out.append(prefix)
    return tuple(out)


def check_trust_flag(value: Any, name: str = "trust_checkpoint") -> bool:
    """A trust switch from the Python API: a real bool only (the string "false" is truthy)."""
    if not isinstance(value, bool):
        raise UserError(f"{name}: expected True or False, not {_short(value)}")
    return value


# compress's own factories, allowed by exact name like the bundled examples': the Hugging Face
# architectures transformers ships, built from a config (compress.hf), which runs no code of a file's
BUILT_IN_FACTORIES = frozenset({"compress.hf:from_config"})


def under(module_name: str, prefixes: Iterable[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


def registered_factories() -> frozenset[str]:
    """'module:callable' references that installed distributions register as model factories
    (entry-point group `compress.models`). Registering one is an act of installing a package, which
    only the person running the tool can do; nothing is imported to list them."""
    from importlib.metadata import entry_points

    try:
        return frozenset(ep.value.replace(" ", "") for ep in entry_points(group=ENTRY_POINT_GROUP))
    except Exception:  # a broken distribution's metadata trusts nothing
        return frozenset()


def _untrusted_hint(module_name: str, refusal: str | None) -> str:
    if refusal:
        return f"{refusal}, so nothing was imported"
    return (f"not trusted, so nothing was imported: if you trust the package, pass --trust-factory "
            f"{module_name} (trust_factories=[{module_name!r}] in Python); a file cannot trust it for you")


def resolve_factory(reference: Any, prefixes: tuple[str, ...]):
    """The class or function named by 'package.module:callable', if the rules above allow it."""
    if not isinstance(reference, str) or len(reference) > 300:
        raise UserError(f"factory {_short(reference)}: expected a string 'package.module:callable'")
    module_name, sep, attr = reference.partition(":")
    if not sep or not _MODULE.fullmatch(module_name) or not attr:
        raise UserError(f"factory {reference!r}: expected 'package.module:callable'")
    parts = attr.split(".")
    if not all(_PUBLIC.fullmatch(p) for p in parts):
        raise UserError(f"factory {reference!r}: the callable must be a public name (no leading underscores)")
    from .examples import FACTORIES

    exact = reference in FACTORIES or reference in BUILT_IN_FACTORIES or reference in registered_factories()
    refusal = None if exact else never_trusted(module_name)
    if not exact and (refusal or not under(module_name, prefixes)):
        raise UserError(f"factory {reference!r}: {_untrusted_hint(module_name, refusal)}")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"factory {reference!r}: cannot import {module_name!r} ({first_line(exc)})") from None
    for i, part in enumerate(parts):
        target = getattr(target, part, None)
        if target is None:
            raise UserError(f"factory {reference!r}: module {module_name!r} has no attribute {attr!r}")
        if i < len(parts) - 1 and not inspect.isclass(target):
            raise UserError(f"factory {reference!r}: {'.'.join(parts[:i + 1])!r} is a {type(target).__name__}, not "
                            "a class; an attribute path passes through classes only (name a module as 'pkg.module:fn')")
    is_module_class = inspect.isclass(target) and issubclass(target, nn.Module)
    # a classmethod of a model class, e.g. transformers' `BertModel.from_pretrained` (a local folder in kwargs)
    is_module_constructor = (inspect.ismethod(target) and inspect.isclass(target.__self__)
                             and issubclass(target.__self__, nn.Module))
    if not (is_module_class or is_module_constructor or inspect.isfunction(target)):
        raise UserError(f"factory {reference!r}: {type(target).__name__} is neither an nn.Module class, a classmethod "
                        "of one, nor a function")
    owner = target.__self__ if is_module_constructor else target
    defined_in = getattr(owner, "__module__", None) or ""
    if not (defined_in == module_name if exact else (under(defined_in, prefixes) and not never_trusted(defined_in))):
        raise UserError(f"factory {reference!r}: {attr!r} is defined in {defined_in!r}, which is not trusted "
                        f"(trusted: {', '.join(prefixes) or 'only the bundled and registered factories'})")
    return target


# keys that turn on code or pickle loading in common loaders, compared without case, '_' or '-'
_CODE_LOADING_KEYS = {"trustremotecode", "trustcheckpoint", "allowpickle", "unsafe", "unsafeload"}
_SAFETY_KEYS = {"weightsonly", "safemode", "usesafetensors"}  # switched off, they load pickles


def check_kwargs(kwargs: Any, reference: str) -> dict[str, Any]:
    """The factory's kwargs if they are bounded JSON-like data."""
    if not isinstance(kwargs, dict):
        raise UserError(f"factory {reference!r}: kwargs must be a mapping, not {type(kwargs).__name__}")
    count = [0]

    def check_key(key, value, path):
        bare = re.sub(r"[^a-z]", "", key.lower())
        if (bare in _CODE_LOADING_KEYS and value not in (None, False)) or (bare in _SAFETY_KEYS and value is False):
            raise UserError(f"factory {reference!r}: kwargs {path} turns on loading code or pickles from files; "
                            "compress never passes that on (load such a model yourself and pass it to compress.apply)")

    def walk(value, depth, path):
        count[0] += 1
        if count[0] > MAX_KWARGS_ITEMS or depth > MAX_KWARGS_DEPTH:
            raise UserError(f"factory {reference!r}: kwargs are too large or too deeply nested (at {path})")
        if value is None or isinstance(value, (bool, str)):
            if isinstance(value, str) and len(value) > MAX_STRING:
                raise UserError(f"factory {reference!r}: kwargs {path} is a string of {len(value)} characters")
            return
        if isinstance(value, int):
            if abs(value) >= 2 ** 63:
                raise UserError(f"factory {reference!r}: kwargs {path} is out of range")
            return
        if isinstance(value, float):
            if not math.isfinite(value):
                raise UserError(f"factory {reference!r}: kwargs {path} is {value}, not a finite number")
            return
        if isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(item, depth + 1, f"{path}[{i}]")
            return
        if isinstance(value, dict):
            for key, item in value.items():
                if not isinstance(key, str):
                    raise UserError(f"factory {reference!r}: kwargs {path} has a non-string key")
                check_key(key, item, f"{path}.{key}")
                walk(item, depth + 1, f"{path}.{key}")
            return
        raise UserError(f"factory {reference!r}: kwargs {path} is a {type(value).__name__}; "
                        "only JSON-like values (numbers, strings, lists, mappings) are allowed")

    for key, value in kwargs.items():
        if not isinstance(key, str) or not _PUBLIC.fullmatch(key):
            raise UserError(f"factory {reference!r}: kwargs key {_short(key)} is not a keyword argument name")
        check_key(key, value, key)
        walk(value, 1, key)
    return kwargs


def build_model(reference: Any, kwargs: Any, prefixes: tuple[str, ...]) -> nn.Module:
    """Resolve, check and call the factory: on the meta device first to bound its size, then for real."""
    factory = resolve_factory(reference, prefixes)
    kwargs = check_kwargs(kwargs if kwargs is not None else {}, reference)

    def call(device=None):
        try:
            if device is None:
                return factory(**kwargs)
            with torch.device(device):
                return factory(**kwargs)
        except TypeError as exc:
            raise UserError(f"factory {reference!r}: does not accept kwargs {sorted(kwargs)} ({first_line(exc)})") from None
        except (ValueError, RuntimeError, OverflowError, MemoryError) as exc:
            raise UserError(f"factory {reference!r} failed with kwargs {_short(kwargs)}: "
                            f"{type(exc).__name__}: {first_line(exc)}") from None

    try:
        shape_only = call("meta")
    except UserError:
        raise
    except Exception:  # a factory that cannot build on the meta device is sized when built for real
        shape_only = None
    if isinstance(shape_only, nn.Module):
        size = sum(t.numel() * t.element_size() for t in (*shape_only.parameters(), *shape_only.buffers()))
        if size > available_memory() // 2:
            raise UserError(f"factory {reference!r} with kwargs {_short(kwargs)} would build a model of "
                            f"{size / 2**30:.1f} GiB, more than half the memory available; refusing to allocate it")
    model = call()
    if not isinstance(model, nn.Module):
        raise UserError(f"factory {reference!r}: returned {type(model).__name__}, not an nn.Module")
    return model


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
