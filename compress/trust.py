"""Which model factories may be imported and called, and what they may be called with.

A safe checkpoint, a `compression.json` and a recipe name the code that builds the model as
'package.module:callable'. Those files come from other people, so naming a callable must not be
enough to run it. A factory is resolved only when all of these hold, checked in this order:

1. It is one of the bundled examples' factories (`compress.examples.FACTORIES`), or its module lies
   under a trusted prefix (dot-separated, so `mypkg` trusts `mypkg.models` but not `mypkgevil`),
   checked *before anything is imported*. Trusted prefixes are those the user names with
   `--trust-factory PREFIX` (or `trust_factories=` in Python) and those listed under `model.trust`
   in the recipe the user chose to run. A file never trusts anything by itself. (Not the whole of
   `compress.examples`: its training functions write files.)
2. The attribute path is public names only (no `_private` or `__dunder__` hops).
3. The object is an `nn.Module` subclass, a classmethod of one (`BertModel.from_pretrained`), or a
   plain Python function, *defined* in a trusted module (its `__module__`), so `os:system`, `shutil:rmtree`, `builtins:exec`, or a trusted module's
   imported `torch.load`, can never be called.
4. The keyword arguments are JSON-like data (None, bool, int, finite float, str, lists, string-keyed
   dicts), bounded in depth and size.
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

_MODULE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*")
_PUBLIC = re.compile(r"[A-Za-z][A-Za-z0-9_]*")
MAX_KWARGS_DEPTH = 8
MAX_KWARGS_ITEMS = 10_000
MAX_STRING = 4096
# Python's own modules hold no models; trusting one of them would only open os.system and friends
_NEVER = frozenset(sys.stdlib_module_names) | {"builtins", "__main__", "importlib", "pickle", "subprocess"}


# packages whose functions load code or pickles from a path in their arguments (torch.hub.load,
# torch.load, compress.checkpoint.load with trust_checkpoint): never trusted wholesale; the
# bundled examples are named exactly instead (compress.examples.* may be trusted by name)
_LOADERS = {"torch", "compress"}


def check_prefix(prefix: str, where: str = "--trust-factory") -> str:
    """A prefix the user wants to trust, validated: a dotted module name outside the standard library
    and outside the packages that load code from files."""
    if not isinstance(prefix, str) or not _MODULE.fullmatch(prefix):
        raise UserError(f"{where} {prefix!r}: expected a module name such as 'mypackage' or 'mypackage.models'")
    top = prefix.split(".")[0]
    if top in _NEVER:
        raise UserError(f"{where} {prefix!r}: Python's standard library holds no model factories; "
                        "name the package that defines your model")
    if top in _LOADERS and not (prefix == "compress.examples" or prefix.startswith("compress.examples.")):
        raise UserError(f"{where} {prefix!r}: {top} has functions that load code or pickles from files "
                        "(torch.hub.load, torch.load, compress.checkpoint.load), so it is never trusted wholesale; "
                        "name the package that defines your model")
    return prefix


def trusted_prefixes(*groups: Iterable[str] | None) -> tuple[str, ...]:
    """The module prefixes of each group given (validated), without repeats."""
    out: list[str] = []
    for group in groups:
        for prefix in group or ():
            check_prefix(prefix)
            if prefix not in out:
                out.append(prefix)
    return tuple(out)


def under(module_name: str, prefixes: Iterable[str]) -> bool:
    return any(module_name == p or module_name.startswith(p + ".") for p in prefixes)


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

    builtin = reference in FACTORIES
    if under(module_name, ("compress.examples.training",)):  # trains and writes checkpoints to a path
        raise UserError(f"factory {reference!r}: compress.examples.training writes files; it is never a factory")
    if not builtin and not under(module_name, prefixes):
        raise UserError(f"factory {reference!r} is not trusted, so nothing was imported: if you trust the package, "
                        f"pass --trust-factory {module_name} (or list it under model.trust in your recipe)")
    try:
        target = importlib.import_module(module_name)
    except ImportError as exc:
        raise UserError(f"factory {reference!r}: cannot import {module_name!r} ({first_line(exc)})") from None
    for part in parts:
        target = getattr(target, part, None)
        if target is None:
            raise UserError(f"factory {reference!r}: module {module_name!r} has no attribute {attr!r}")
    is_module_class = inspect.isclass(target) and issubclass(target, nn.Module)
    # a classmethod of a model class, e.g. transformers' `BertModel.from_pretrained` (a local folder in kwargs)
    is_module_constructor = (inspect.ismethod(target) and inspect.isclass(target.__self__)
                             and issubclass(target.__self__, nn.Module))
    if not (is_module_class or is_module_constructor or inspect.isfunction(target)):
        raise UserError(f"factory {reference!r}: {type(target).__name__} is neither an nn.Module class, a classmethod "
                        "of one, nor a function")
    owner = target.__self__ if is_module_constructor else target
    defined_in = getattr(owner, "__module__", None) or ""
    if not (defined_in == module_name if builtin else under(defined_in, prefixes)):
        raise UserError(f"factory {reference!r}: {attr!r} is defined in {defined_in!r}, which is not trusted "
                        f"(trusted: {', '.join(prefixes) or 'only the bundled examples'})")
    return target


def check_kwargs(kwargs: Any, reference: str) -> dict[str, Any]:
    """The factory's kwargs if they are bounded JSON-like data."""
    if not isinstance(kwargs, dict):
        raise UserError(f"factory {reference!r}: kwargs must be a mapping, not {type(kwargs).__name__}")
    count = [0]

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
                walk(item, depth + 1, f"{path}.{key}")
            return
        raise UserError(f"factory {reference!r}: kwargs {path} is a {type(value).__name__}; "
                        "only JSON-like values (numbers, strings, lists, mappings) are allowed")

    for key, value in kwargs.items():
        if not isinstance(key, str) or not _PUBLIC.fullmatch(key):
            raise UserError(f"factory {reference!r}: kwargs key {_short(key)} is not a keyword argument name")
        if key in ("trust_remote_code", "trust_checkpoint") and value:
            raise UserError(f"factory {reference!r}: kwargs set {key}, which runs code from files; compress "
                            "never passes that on (load such a model yourself and pass it to compress.apply)")
        walk(value, 1, key)
    return kwargs


def available_memory() -> int:
    """Bytes of memory available to allocate now (MemAvailable on Linux, else physical memory)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        import os

        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


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
