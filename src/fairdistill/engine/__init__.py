"""The training engine: building a run (build), its stages, one step (step), the checkpoint
format (checkpoint), evaluation (evaluate) and the loop (trainer)."""
from __future__ import annotations

from .build import load_run_model
from .checkpoint import load_checkpoint, save_checkpoint
from .evaluate import evaluate, evaluate_run
from .step import Precision
from .trainer import Trainer, train

__all__ = ["Precision", "Trainer", "evaluate", "evaluate_run", "load_checkpoint", "load_run_model", "save_checkpoint",
           "train"]
