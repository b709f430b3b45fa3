"""Named methods as presets of terms, stages, sampler and teacher mode (DESIGN.md contract 3).

``expand_method("ss+hkd")`` merges the presets ``ss`` and ``hkd``; any combination works, and a
config's own ``terms`` / ``stages`` / ``data`` values override the preset's. When stages name
their terms explicitly, a term that no stage names joins the last stage (so ``ad+fitnet``
trains the adversary with KD after the hint stage). Weights and options here are the original
methods' official defaults; per-data-set values (the MFD supplement's Table 1, OFD's alpha,
positions) live in ``configs/<dataset>/``.
"""
from __future__ import annotations

from ..errors import ConfigError
from ..registry import suggest
from .files import deep_merge

# Hinton KD as the MFD code runs it: lambda_h annealed 4 -> 1 over the stage, T = 3.
KD = {"type": "kd", "weight": 4.0, "weight_end": 1.0, "T": 3.0}

PRESETS: dict[str, dict] = {
    # Plain cross-entropy training (the teacher and the "student (scratch)" rows).
    "scratch": {},
    "hkd": {"terms": {"kd": KD}},
    # Strategic sampling: every (group, label) cell oversampled to the largest (MFD's SS).
    "ss": {"data": {"sampler": "balanced"}},
    # FitNets, two stages as in the MFD code (trainer/kd_fitnet.py): hints on the embedding for
    # half the epochs (no CE, no test evaluation, no lr schedule), then KD with the same Adam
    # continued. OFD-table configs switch to a stage feature with a regressor.
    "fitnet": {
        "terms": {"fitnet": {"type": "fitnet-hint", "feature": "embedding", "weight": 1.0}, "kd": KD},
        "stages": [
            {"name": "hint", "epochs_scale": 0.5, "terms": ["fitnet"], "ce_weight": 0.0, "evaluate": False,
             "schedule": {"name": "none"}},
            {"name": "main", "terms": ["kd"], "optimizer": "continue"},
        ],
    },
    # One-stage FitNets (hints and KD together; MFD supplement 1.3, used for AD+FitNet).
    "fitnet-simul": {"terms": {"fitnet": {"type": "fitnet-hint", "feature": "embedding", "weight": 1.0}, "kd": KD}},
    # Attention transfer (Zagoruyko & Komodakis): every group output, beta = 1000.
    "at": {"terms": {"at": {"type": "at", "position": "block", "positions": "all", "weight": 1000.0}}},
    # Neural selectivity transfer (Huang & Wang): last pre-ReLU map, weight 50.
    "nst": {"terms": {"nst": {"type": "nst", "position": "prerelu", "positions": "last", "weight": 50.0}}},
    # Jacobian matching (Srinivas & Fleuret): KD-Zoo's lambda 20 rescaled to a per-sample sum.
    "jacobian": {"terms": {"jacobian": {"type": "jacobian", "weight": 6.5e-3}}},
    # Factor transfer (Kim et al.): paraphraser trained first by reconstruction, then beta = 500.
    "ft": {
        "terms": {
            "ft_paraphraser": {"type": "ft-paraphraser", "rate": 0.5, "weight": 1.0},
            "ft": {"type": "ft", "paraphraser": "ft_paraphraser", "weight": 500.0},
        },
        "stages": [
            {"name": "paraphraser", "epochs": 5, "terms": ["ft_paraphraser"], "ce_weight": 0.0,
             "train": ["ft_paraphraser"], "optim": {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4},
             "schedule": {"name": "none"}},
            {"name": "main", "terms": ["ft"]},
        ],
    },
    # Activation boundaries (Heo et al., AAAI 2019): initialisation by the AB loss alone with the
    # teacher's BN in train mode, then KD only (T = 3), as the official script.
    "ab": {
        "terms": {
            "ab": {"type": "ab", "position": "prerelu", "margin": 1.0, "weight": 3e-3},
            "kd": {"type": "kd", "weight": 1.0, "T": 3.0},
        },
        "stages": [
            {"name": "ab-init", "epochs": 30, "terms": ["ab"], "ce_weight": 0.0, "train": ["student", "ab"],
             "teacher_bn_mode": "train"},
            {"name": "main", "terms": ["kd"], "ce_weight": 0.0},
        ],
    },
    # OFD (Heo et al., ICCV 2019): margin ReLU, pre-ReLU positions, connectors, partial L2;
    # alpha = 1e-3 (CIFAR; 1e-4 ImageNet); the teacher's BN in train mode as the official code.
    "ofd": {"terms": {"ofd": {"type": "ofd", "weight": 1e-3}}, "teacher": {"bn_mode": "train"}},
    # MFD (Jung et al., CVPR 2021): lambda/2 * sum of per-(class, group) MMD^2 on the embedding,
    # balanced sampler, teacher in eval mode; lambda = 3 here (CIFAR-10S, UTKFace; CelebA 7).
    "mfd": {"terms": {"mfd": {"type": "mfd", "weight": 3.0, "sigma": 1.0, "kernel": "rbf"}},
            "data": {"sampler": "balanced"}},
    # Adversarial debiasing as the MFD paper: one adversary per class on the logits, gradient
    # reversal of scale grl_lambda (the supplement's strength), adversaries trained by Adam 3e-3.
    "ad": {"terms": {"adversary": {"type": "adversary", "weight": 1.0, "grl_lambda": 2.0, "lr": 0.003}}},
}


def expand_method(method: str) -> dict:
    """The merged preset for ``a+b+...`` (later presets override earlier ones)."""
    out: dict = {}
    for part in [p.strip() for p in method.split("+") if p.strip()] or ["scratch"]:
        if part not in PRESETS:
            raise ConfigError(
                f"method: unknown method {part!r}.{suggest(part, PRESETS)} "
                f"Valid methods: {', '.join(sorted(PRESETS))} (combine with '+')."
            )
        out = deep_merge(out, PRESETS[part])
    return out


def attach_unstaged_terms(data: dict) -> dict:
    """Add terms that no explicit stage names to the last stage (see the module docstring)."""
    stages = data.get("stages") or []
    if not stages or not all(isinstance(s, dict) for s in stages) or stages[-1].get("terms") is None:
        return data
    named = {t for s in stages for t in (s.get("terms") or [])}
    missing = [t for t in (data.get("terms") or {}) if t not in named]
    if missing:
        stages[-1] = {**stages[-1], "terms": [*stages[-1]["terms"], *missing]}
        trained = stages[-1].get("train")
        if trained is not None:
            stages[-1]["train"] = [*trained, *missing]
    return data
