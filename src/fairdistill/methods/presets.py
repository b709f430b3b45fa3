"""Named methods as presets of terms, stages and sampler (DESIGN.md contract 3).

``expand_method("ss+hkd")`` merges the presets ``ss`` and ``hkd``; any combination works, and a
config's own ``terms`` / ``stages`` / ``data`` values override the preset's. Weights and options
here are the defaults of the papers' official code; per-data-set values (the MFD supplement's
Table 1, OFD's alpha) live in ``configs/<dataset>/``.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import suggest

PRESETS: dict[str, dict] = {
    # Plain cross-entropy training (the teacher and the "student (scratch)" rows).
    "scratch": {},
    # Hinton KD with the MFD code's annealed strength: lambda_h 4 -> 1 over the stage, T = 3.
    "hkd": {"terms": {"kd": {"type": "kd", "weight": 4.0, "weight_end": 1.0, "T": 3.0}}},
    # Strategic sampling: every (group, label) cell oversampled to the largest (MFD's SS).
    "ss": {"data": {"sampler": "balanced"}},
}


def expand_method(method: str) -> dict:
    """The merged preset for ``a+b+...`` (later presets override earlier ones)."""
    from ..config import deep_merge

    out: dict = {}
    for part in [p.strip() for p in method.split("+") if p.strip()] or ["scratch"]:
        if part not in PRESETS:
            raise ConfigError(
                f"method: unknown method {part!r}.{suggest(part, PRESETS)} "
                f"Valid methods: {', '.join(sorted(PRESETS))} (combine with '+')."
            )
        out = deep_merge(out, PRESETS[part])
    return out
