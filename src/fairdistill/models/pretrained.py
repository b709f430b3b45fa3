"""Backbone weights from a local file: kept as an import path; the loader is ``models/weights.py``."""
from __future__ import annotations

from .weights import SHOWN, WRAPPERS, load_backbone_weights, read_state_dict

__all__ = ["SHOWN", "WRAPPERS", "load_backbone_weights", "read_state_dict"]
