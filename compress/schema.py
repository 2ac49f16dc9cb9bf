"""The base of every recipe section: the strictness the whole recipe schema shares."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Strict(BaseModel):
    """A recipe section: unknown keys are errors, not silently ignored, and every number is finite
    (`.inf` would silently turn a tolerance, a gate or a weight off)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, strict=True)
