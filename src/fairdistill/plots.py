"""Figures: the t-SNE of a run's penultimate features (MFD Figure 5) and accuracy against DEO.

matplotlib is optional (``pip install 'fairdistill[plots]'``) and imported only inside the
functions that draw; figures are drawn on a ``matplotlib.figure.Figure`` (no pyplot state).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, FairdistillError

MARKERS = "os^Dv<>phP*X8"
"""Marker per group (t-SNE) or per method (accuracy vs DEO), in order."""

TSNE_SUPPLEMENT = {"n_components": 3, "perplexity": 200.0, "early_exaggeration": 1.0, "max_iter": 250,
                   "metric": "cosine", "random_state": 5}
"""The t-SNE settings of the MFD supplement (section 1.4); scikit-learn's defaults otherwise."""


def _matplotlib():
    """``(Figure, colormaps)``, or a FairdistillError that says how to install matplotlib."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise FairdistillError("drawing needs matplotlib: pip install 'fairdistill[plots]'") from None
    return Figure, matplotlib.colormaps


@dataclass
class Embeddings:
    """Penultimate features of a test set with each item's class and group."""

    features: np.ndarray  # (N, D) float32
    labels: np.ndarray  # (N,)
    groups: np.ndarray  # (N,)
    class_names: list
    group_names: list


@torch.no_grad()
def run_embeddings(run_dir: str | Path, device: str | None = None, max_points: int | None = None,
                   seed: int = 0) -> Embeddings:
    """``Features.embedding`` (flattened) of the run's final checkpoint on its test set.

    ``max_points`` keeps a uniformly drawn subset (generator seeded with ``seed``).
    """
    from .data import BatchLoader
    from .engine import load_run_model

    run = load_run_model(run_dir, device)
    test, model = run.test_set, run.model
    if max_points is not None:
        if max_points < 1:
            raise ConfigError(f"max_points: must be >= 1, got {max_points}")
        if max_points < len(test):
            keep = np.sort(np.random.default_rng(seed).choice(len(test), max_points, replace=False))
            test = test.subset(torch.from_numpy(keep))
    feats, labels, groups = [], [], []
    for x, y, g in BatchLoader(test, run.cfg.data.eval_batch_size, sampler="sequential", device=run.device).epoch(0):
        feats.append(model.forward_features(x).embedding.flatten(1).float().cpu())
        labels.append(y.cpu())
        groups.append(g.cpu())
    return Embeddings(torch.cat(feats).numpy(), torch.cat(labels).numpy(), torch.cat(groups).numpy(),
                      test.class_names, test.group_names)


def tsne(features: np.ndarray, n_components: int = 3, perplexity: float = 200.0, early_exaggeration: float = 1.0,
         max_iter: int = 250, metric: str = "cosine", random_state: int = 5) -> np.ndarray:
    """scikit-learn's t-SNE with the MFD supplement's settings as defaults; (N, n_components)."""
    from sklearn.manifold import TSNE

    n = len(features)
    if not perplexity < n:
        raise ConfigError(f"perplexity: {perplexity} must be smaller than the number of points ({n}); "
                          "lower --perplexity or keep more points (--max-points)")
    if max_iter < 250:
        raise ConfigError(f"max_iter: scikit-learn's t-SNE needs at least 250 iterations, got {max_iter}")
    # scikit-learn >= 1.5 names the iteration count max_iter; older versions n_iter
    iters = "max_iter" if "max_iter" in inspect.signature(TSNE).parameters else "n_iter"
    model = TSNE(n_components=n_components, perplexity=perplexity, early_exaggeration=early_exaggeration,
                 metric=metric, random_state=random_state, **{iters: max_iter})
    return model.fit_transform(np.asarray(features, dtype=np.float32))


def _colors(colormaps, n: int) -> np.ndarray:
    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return np.array([cmap(i % cmap.N) for i in range(n)])


def draw_tsne(points: np.ndarray, emb: Embeddings, out: str | Path, title: str = "") -> Path:
    """3-D (or 2-D) scatter of ``points``: colour = class, marker = group, with a legend."""
    Figure, colormaps = _matplotlib()
    from matplotlib.lines import Line2D

    out = Path(out)
    three = points.shape[1] == 3
    fig = Figure(figsize=(9, 7))
    ax = fig.add_subplot(projection="3d" if three else None)
    colors = _colors(colormaps, len(emb.class_names))
    for g in np.unique(emb.groups):
        m = emb.groups == g
        ax.scatter(*points[m].T, c=colors[emb.labels[m]], marker=MARKERS[g % len(MARKERS)], s=9, alpha=0.75,
                   linewidths=0, **({"depthshade": False} if three else {}))
    handles = [Line2D([], [], ls="", marker="o", color=colors[c], label=str(name)) for c, name in enumerate(emb.class_names)]
    handles += [Line2D([], [], ls="", marker=MARKERS[g % len(MARKERS)], color="0.3", label=f"group: {name}")
                for g, name in enumerate(emb.group_names)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, frameon=False)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return out


def tsne_run(run_dir: str | Path, out: str | Path | None = None, max_points: int | None = None,
             device: str | None = None, **settings) -> Path:
    """Draw the t-SNE of run ``run_dir``'s test-set embeddings into ``out`` (default
    ``RUN_DIR/tsne.png``); ``settings`` override :data:`TSNE_SUPPLEMENT`."""
    _matplotlib()  # fail before the slow part when matplotlib is missing
    unknown = sorted(set(settings) - set(TSNE_SUPPLEMENT))
    if unknown:
        raise ConfigError(f"t-SNE: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(TSNE_SUPPLEMENT)}")
    params = {**TSNE_SUPPLEMENT, **settings}
    emb = run_embeddings(run_dir, device=device, max_points=max_points)
    points = tsne(emb.features, **params)
    title = (f"{Path(run_dir)}: t-SNE of the test-set embeddings ({len(points)} points, perplexity {params['perplexity']:g}, "
             f"{params['metric']})")
    return draw_tsne(points, emb, out or Path(run_dir) / "tsne.png", title=title)


def accuracy_vs_deo(rows: list[tuple[str, list[dict]]], out: str | Path, title: str = "") -> Path:
    """Accuracy against DEO_A and DEO_M (x100, final epoch): per method a marker at the mean
    with sample-std error bars, and each seed's run as a faint point of the same marker."""
    Figure, colormaps = _matplotlib()
    out = Path(out)
    fig = Figure(figsize=(11, 4.8))
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    colors = _colors(colormaps, len(rows))
    for i, (label, results) in enumerate(rows):
        acc = np.array([100 * r["final"]["accuracy"] for r in results])
        marker = MARKERS[i % len(MARKERS)]
        for ax, key in zip(axes, ("deo_a", "deo_m")):
            deo = np.array([100 * r["final"][key] for r in results])
            ax.scatter(deo, acc, color=colors[i], marker=marker, s=18, alpha=0.35, linewidths=0)
            spread = len(results) > 1
            ax.errorbar(deo.mean(), acc.mean(), xerr=deo.std(ddof=1) if spread else None,
                        yerr=acc.std(ddof=1) if spread else None, color=colors[i], marker=marker, ms=8,
                        capsize=3, lw=1, label=label if key == "deo_a" else None)
    for ax, name in zip(axes, ("DEO_A", "DEO_M")):
        ax.set_xlabel(f"{name} (%) - lower is fairer")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    fig.legend(loc="center right", fontsize=8, frameon=False)
    fig.suptitle(f"{title}: mean ± sample std over seeds (faint: single runs)" if title else "", fontsize=10)
    fig.tight_layout(rect=(0, 0, 0.84, 1))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=130)
    return out
