"""Distillation methods: loss terms (one module per method), presets and the objective."""
from __future__ import annotations

from . import ab, adversary, at, fitnet, ft, jacobian, kd, mfd, nst, ofd  # noqa: F401  (register terms)
from .base import TERMS, SetupContext, Term, TermInput

__all__ = ["TERMS", "SetupContext", "Term", "TermInput"]
