"""The registry of compression methods: adding one is one file and one line here (a method that
makes a new kind of structural edit registers it in its own file, see base.register_edit)."""
from .base import EDITS, Decision, LayerProfile, Method, Stage, Targets
from .afm import Afm
from .group_envelope import GroupEnvelope
from .pela import Pela
from .svd import Svd
from .trp import Trp

METHODS: dict[str, type[Method]] = {cls.name: cls for cls in (Svd, Trp, Afm, Pela, GroupEnvelope)}

__all__ = ["EDITS", "METHODS", "Decision", "LayerProfile", "Method", "Stage", "Targets"]
