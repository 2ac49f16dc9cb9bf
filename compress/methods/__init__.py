"""The registry of compression methods: adding one is one file and one line here (a method that
makes a new kind of structural edit registers it in its own file, see base.register_edit), or a
plug-in: an installed distribution that names its `Method` subclass under the entry-point group
`compress.methods` (see examples/plugin/). Plug-ins are found when compress starts; a plug-in is
code of an installed package and runs only because someone installed it, exactly like the package's
own imports. One that cannot be loaded, or is not a well-formed method, is left out with a
one-line warning, and never shadows a built-in method."""
from __future__ import annotations

import sys
import typing

from ..errors import first_line
from .base import ACTIONS, EDITS, Decision, LayerProfile, Method, Stage, Targets
from .afm import Afm
from .group_envelope import GroupEnvelope
from .pela import Pela
from .svd import Svd
from .trp import Trp

ENTRY_POINT_GROUP = "compress.methods"

BUILT_IN: dict[str, type[Method]] = {cls.name: cls for cls in (Svd, Trp, Afm, Pela, GroupEnvelope)}


def plugin_problem(name: str, cls) -> str | None:
    """Why an entry point's object is not a method compress can drive, or None."""
    if not (isinstance(cls, type) and issubclass(cls, Method)):
        return f"is {type(cls).__name__}, not a subclass of compress.methods.Method"
    if getattr(cls, "name", None) != name or not name.isidentifier():
        return f"its class says name {getattr(cls, 'name', None)!r}; the entry point's name must be the same identifier"
    if name in BUILT_IN:
        return f"{name!r} is a built-in method"
    schema = getattr(cls, "schema", None)
    if not (isinstance(schema, type) and issubclass(schema, Stage)):
        return "its `schema` is not a subclass of compress.methods.Stage"
    field = schema.model_fields.get("method")
    if field is None or typing.get_args(field.annotation) != (name,) or field.default != name:
        return f"its schema's `method` field must be Literal[{name!r}] with default {name!r}"
    return None


def discover_plugins() -> dict[str, type[Method]]:
    """{name: Method subclass} of every well-formed plug-in installed."""
    from importlib.metadata import entry_points

    found: dict[str, type[Method]] = {}
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        try:
            cls = ep.load()
            problem = plugin_problem(ep.name, cls)
        except Exception as exc:  # noqa: BLE001 - someone else's package: say so and go on
            problem = f"cannot be loaded ({first_line(exc, 120)})"
        if problem is None and ep.name in found:
            problem = "two installed plug-ins use this name"
        if problem:
            sys.stderr.write(f"warning: method plug-in {ep.name!r} ({ep.value}) left out: {problem}\n")
            continue
        found[ep.name] = cls
    return found


METHODS: dict[str, type[Method]] = {**BUILT_IN, **discover_plugins()}

__all__ = ["ACTIONS", "BUILT_IN", "EDITS", "METHODS", "Decision", "LayerProfile", "Method", "Stage", "Targets"]
