"""Figures: training curves, the t-SNE of a run's penultimate features (MFD Figure 5) and
accuracy against DEO.

matplotlib is optional (``pip install 'fairdistill[plots]'``) and imported only inside the
functions that draw; figures are drawn on a ``matplotlib.figure.Figure`` (no pyplot state).
Runs are named by their method and seed (:func:`run_label`), never by their path.
"""
from __future__ import annotations

import inspect
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .errors import ConfigError, DataError, FairdistillError
from .rundir import RunDir

MARKERS = "os^Dv<>phP*X8d"
"""Marker per method (accuracy vs DEO), in order."""

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf", "#000000", "#005f5f", "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94",
           "#f7b6d2", "#dbdb8d"]
"""Qualitative colours, one per method or run: matplotlib's tab10, black and dark teal, then
tab20's light shades (used together with :data:`MARKERS`, so that 12 methods stay apart)."""

GROUP_COLORS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#f0e442", "#000000"]
"""Colours of the groups in the t-SNE (Okabe and Ito's colour-blind-safe set)."""

TSNE_SUPPLEMENT = {"n_components": 3, "perplexity": 200.0, "early_exaggeration": 1.0, "max_iter": 250,
                   "metric": "cosine", "random_state": 5}
"""The t-SNE settings of the MFD supplement (section 1.4); scikit-learn's defaults otherwise."""

DPI = 130


def _matplotlib():
    """``(Figure, colormaps)``, or a FairdistillError that says how to install matplotlib."""
    try:
        import matplotlib
        from matplotlib.figure import Figure
    except ImportError:
        raise FairdistillError("drawing needs matplotlib: pip install 'fairdistill[plots]'") from None
    return Figure, matplotlib.colormaps


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=DPI)
    return out


def colors(n: int) -> list[str]:
    """``n`` colours of :data:`PALETTE` (cycled beyond 20)."""
    return [PALETTE[i % len(PALETTE)] for i in range(n)]


# ----------------------------------------------------------------------------- runs


def run_label(run_dir: str | Path) -> str:
    """``"<name> (<method>) seed <seed>"`` from the run's ``config.yaml``; the name is left out
    when it only spells the method (``mfd``, ``ss_hkd`` for ``ss+hkd``)."""
    cfg = RunDir(run_dir).read_config()
    name, method = cfg.name, cfg.method
    same = not name or name.replace("_", "+").replace("-", "+").lower() == method.lower()
    return f"{method if same else f'{name} ({method})'} seed {cfg.seed}"


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` file, one per epoch.

    A last line that is not complete JSON (a run killed while writing) is dropped; a broken line
    elsewhere is a DataError naming the file and the line.
    """
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DataError(f"{path}: cannot read the run's metrics ({e.strerror or e})") from None
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise DataError(f"{path}, line {i + 1}: not a JSON record ({line[:60]!r}...)") from None
        if not isinstance(rec, dict):
            raise DataError(f"{path}, line {i + 1}: expected a JSON object per epoch, got {type(rec).__name__}")
        records.append(rec)
    return records


def _labels(run_dirs: list) -> list[str]:
    """:func:`run_label` of each run, made unique by the run folder's name where two agree."""
    labels = [run_label(d) for d in run_dirs]
    for i, lab in enumerate(labels):
        if labels.count(lab) > 1:
            labels = [f"{x} ({Path(d).name})" if x == lab else x for x, d in zip(labels, run_dirs)]
    return labels


# ----------------------------------------------------------------------------- training curves


def _series(records: list[dict], split: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(global epochs, values) of ``record[split][key]`` over the records that have a number there."""
    xs, ys = [], []
    for i, r in enumerate(records):
        v = (r.get(split) or {}).get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            xs.append(r.get("global_epoch", i + 1))
            ys.append(v)
    return np.array(xs, dtype=float), np.array(ys, dtype=float)


def _stage_starts(records: list[dict]) -> list[tuple[float, str, str]]:
    """(x of the boundary, the stage that ends there, the stage that starts there) for every
    stage after the first."""
    out, prev = [], None
    for i, r in enumerate(records):
        stage = r.get("stage")
        if prev is not None and stage != prev:
            out.append((r.get("global_epoch", i + 1) - 0.5, str(prev), str(stage)))
        prev = stage
    return out


def training_curves(run_dirs: list, out: str | Path, title: str = "") -> Path:
    """Per-epoch curves of one or several runs from their ``metrics.jsonl``, as a PNG.

    Four panels over the run's epochs (all stages, in order): the training loss and each of its
    parts (line style per part), accuracy (train solid, test dashed, validation dotted), and the
    test (and validation) DEO_A and DEO_M in %. Colour = run, labelled by :func:`run_label`;
    dotted vertical lines mark where a stage starts.
    """
    Figure, _ = _matplotlib()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    run_dirs = [Path(d) for d in run_dirs]
    if not run_dirs:
        raise ConfigError("plot: name at least one run directory")
    labels = _labels(run_dirs)  # fails first on a folder that is no run directory
    runs = []
    for d in run_dirs:
        records = read_metrics(RunDir(d).metrics)
        if not records:
            raise DataError(f"{RunDir(d).metrics}: no completed epoch to plot yet")
        runs.append(records)
    cols = colors(len(runs))
    fig = Figure(figsize=(12, 8.2))
    ax_loss, ax_acc, ax_a, ax_m = (fig.add_subplot(2, 2, i + 1) for i in range(4))
    styles = ["-", "--", ":", "-.", (0, (6, 2, 1, 2, 1, 2)), (0, (1, 4)), (0, (10, 3))]
    parts = sorted({k for records in runs for r in records for k in (r.get("train") or {})} - {"accuracy", "loss"})
    parts = ["loss", *parts]  # the total first
    positive = True
    for records, color in zip(runs, cols):
        for j, part in enumerate(parts):
            x, y = _series(records, "train", part)
            if len(x):
                positive &= bool((y > 0).all())
                ax_loss.plot(x, y, color=color, ls=styles[j % len(styles)], lw=1.6 if part == "loss" else 1.1)
        for split, ls in (("train", "-"), ("test", "--"), ("val", ":")):
            x, y = _series(records, split, "accuracy")
            if len(x):
                ax_acc.plot(x, 100 * y, color=color, ls=ls, marker="o" if split != "train" else None, ms=3.5)
        for ax, key in ((ax_a, "deo_a"), (ax_m, "deo_m")):
            for split, ls in (("test", "-"), ("val", ":")):
                x, y = _series(records, split, key)
                if len(x):
                    ax.plot(x, 100 * y, color=color, ls=ls, marker="o", ms=3.5)
    if positive:
        ax_loss.set_yscale("log")
    boundaries = sorted({b for records in runs for b in _stage_starts(records)})
    for ax in (ax_loss, ax_acc, ax_a, ax_m):
        for x, before, after in boundaries:
            ax.axvline(x, color="0.55", ls=":", lw=1, gid="stage")
            for text, ha in ((f"{before} ", "right"), (f" {after}", "left")):
                ax.text(x, 0.99, text, transform=ax.get_xaxis_transform(), fontsize=7, color="0.35", va="top", ha=ha)
        ax.grid(alpha=0.3)
        ax.set_xlabel("epoch (all stages)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_title("training loss and its parts", fontsize=10)
    ax_acc.set_title("accuracy (%)", fontsize=10)
    ax_a.set_title("DEO_A (%): mean over classes of the group gap", fontsize=10)
    ax_m.set_title("DEO_M (%): largest class gap", fontsize=10)
    ax_acc.set_ylim(top=100)
    for ax in (ax_a, ax_m):
        ax.set_ylim(bottom=0)
    style = lambda ls, lab: Line2D([], [], color="0.3", ls=ls, label=lab)  # noqa: E731
    ax_loss.legend(handles=[style(styles[j % len(styles)], p) for j, p in enumerate(parts)], fontsize=7,
                   loc="upper right", title="part", title_fontsize=7, handlelength=4)
    splits = {s for records in runs for r in records for s in ("test", "val") if s in r}
    ax_acc.legend(handles=[style("-", "train"), *(style(ls, s) for s, ls in (("test", "--"), ("val", ":")) if s in splits)],
                  fontsize=7, loc="lower right")
    if "val" in splits:
        ax_a.legend(handles=[style("-", "test"), style(":", "val")], fontsize=7, loc="upper right")
    handles = [Line2D([], [], color=c, lw=2.5, label=lab) for c, lab in zip(cols, labels)]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 4), fontsize=8, frameon=False)
    fig.suptitle(title or ("training curves: " + ", ".join(labels) if len(labels) <= 3 else
                           f"training curves of {len(labels)} runs"), fontsize=11)
    rows = math.ceil(len(handles) / 4)
    fig.tight_layout(rect=(0, 0.03 + 0.03 * rows, 1, 1))
    return _save(fig, out)


# ----------------------------------------------------------------------------- t-SNE


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
    for x, y, g in BatchLoader(test, run.cfg.data.eval_batch_size, sampler="sequential", device=run.device,
                               crop=run.cfg.data.eval_crop, crop_key="data.eval_crop").epoch(0):
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


def draw_tsne(points: np.ndarray, emb: Embeddings, out: str | Path, title: str = "", subtitle: str = "") -> Path:
    """Two scatters of the same 3-D (or 2-D) ``points`` from the same viewpoint: coloured by
    group (left) and by class (right), each with its legend and item counts.

    Points are drawn in one shuffled order (fixed seed) so that no group hides another.
    """
    Figure, colormaps = _matplotlib()
    from matplotlib.lines import Line2D

    three = points.shape[1] == 3
    fig = Figure(figsize=(14, 6.6))
    order = np.random.default_rng(0).permutation(len(points))
    p, labels, groups = points[order], emb.labels[order], emb.groups[order]
    cmap = colormaps["tab10" if len(emb.class_names) <= 10 else "tab20"]
    class_colors = np.array([cmap(i % cmap.N) for i in range(len(emb.class_names))])
    group_colors = np.array([GROUP_COLORS[i % len(GROUP_COLORS)] for i in range(len(emb.group_names))])
    panels = (("group", group_colors, groups, emb.group_names), ("class", class_colors, labels, emb.class_names))
    for i, (what, palette, index, names) in enumerate(panels):
        ax = fig.add_subplot(1, 2, i + 1, projection="3d" if three else None)
        ax.scatter(*p.T, c=list(palette[index]), s=14, alpha=0.8, linewidths=0,
                   **({"depthshade": False} if three else {}))
        counts = np.bincount(index, minlength=len(names))
        handles = [Line2D([], [], ls="", marker="o", ms=7, color=palette[k], label=f"{name} ({counts[k]})")
                   for k, name in enumerate(names)]
        ax.legend(handles=handles, loc="upper left", fontsize=8, title=f"colour = {what}", title_fontsize=8,
                  ncol=1 if len(names) <= 12 else 2, framealpha=0.85)
        ax.set_title(f"coloured by {what}", fontsize=10)
        if three:
            ax.view_init(elev=22, azim=-60)
            ax.tick_params(labelsize=7)
    fig.suptitle(title + (f"\n{subtitle}" if subtitle else ""), fontsize=11)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return _save(fig, out)


def tsne_run(run_dir: str | Path, out: str | Path | None = None, max_points: int | None = None,
             device: str | None = None, **settings) -> Path:
    """Draw the t-SNE of run ``run_dir``'s test-set embeddings into ``out`` (default
    ``RUN_DIR/tsne.png``); ``settings`` override :data:`TSNE_SUPPLEMENT`."""
    _matplotlib()  # fail before the slow part when matplotlib is missing
    unknown = sorted(set(settings) - set(TSNE_SUPPLEMENT))
    if unknown:
        raise ConfigError(f"t-SNE: unknown setting(s) {', '.join(unknown)}; valid: {', '.join(TSNE_SUPPLEMENT)}")
    params = {**TSNE_SUPPLEMENT, **settings}
    label = run_label(run_dir)
    emb = run_embeddings(run_dir, device=device, max_points=max_points)
    points = tsne(emb.features, **params)
    subtitle = (f"{len(points)} test images; {params['n_components']}-D t-SNE, perplexity {params['perplexity']:g}, "
                f"{params['metric']} metric, {params['max_iter']} iterations, random state {params['random_state']}")
    return draw_tsne(points, emb, out or Path(run_dir) / "tsne.png",
                     title=f"{label}: t-SNE of the penultimate features", subtitle=subtitle)


# ----------------------------------------------------------------------------- accuracy vs DEO


def clipped_err(mean: float, std: float | None, lo: float = 0.0, hi: float = 100.0) -> list[list[float]] | None:
    """Asymmetric error bar ``[[below], [above]]`` of mean ± std cut at the metric's range [lo, hi]."""
    if std is None or not math.isfinite(std):
        return None
    return [[max(0.0, min(std, mean - lo))], [max(0.0, min(std, hi - mean))]]


def _mean_std(values: np.ndarray) -> tuple[float, float | None]:
    return float(values.mean()), (float(values.std(ddof=1)) if len(values) > 1 else None)


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.1f}" if std is None else f"{mean:.1f} ± {std:.1f}"


def accuracy_vs_deo(rows: list[tuple[str, list[dict]]], out: str | Path, title: str = "") -> Path:
    """Accuracy against DEO_A and DEO_M (x100, final epoch), and a legend table.

    Per method: a distinct colour and marker at the mean, with sample-std (ddof = 1) error bars
    cut at [0, 100], and each seed's run as a faint point of the same marker. The table beside
    the panels lists each method's marker, mean ± std of the three numbers and its run count,
    so that no label is drawn among the points.
    """
    Figure, _ = _matplotlib()
    fig = Figure(figsize=(15, max(5.2, 1.4 + 0.34 * len(rows))))
    grid = fig.add_gridspec(1, 3, width_ratios=[1, 1, 0.95], wspace=0.28)
    axes = [fig.add_subplot(grid[0, i]) for i in range(2)]
    table = fig.add_subplot(grid[0, 2])
    cols = colors(len(rows))
    stats = []
    for i, (label, results) in enumerate(rows):
        acc = np.array([100 * r["final"]["accuracy"] for r in results])
        marker, color = MARKERS[i % len(MARKERS)], cols[i]
        row = {"acc": _mean_std(acc)}
        for ax, key in zip(axes, ("deo_a", "deo_m")):
            deo = np.array([100 * r["final"][key] for r in results])
            row[key] = _mean_std(deo)
            ax.scatter(deo, acc, color=color, marker=marker, s=16, alpha=0.3, linewidths=0)
            (mx, sx), (my, sy) = row[key], row["acc"]
            ax.errorbar(mx, my, xerr=clipped_err(mx, sx), yerr=clipped_err(my, sy), color=color, marker=marker,
                        ms=9, mec="white", mew=0.6, capsize=3, lw=1.1, alpha=0.9, zorder=3)
        stats.append((label, marker, color, row, len(results)))
    for ax, name in zip(axes, ("DEO_A", "DEO_M")):
        ax.set_xlabel(f"{name} (%): lower is fairer")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        (x0, x1), (y0, y1) = ax.get_xlim(), ax.get_ylim()
        ax.set_xlim(max(x0, -2.0), min(x1, 102.0))
        ax.set_ylim(max(y0, -2.0), min(y1, 102.0))
        ax.set_title(f"accuracy vs {name}", fontsize=10)
    _legend_table(table, stats)
    fig.suptitle(f"{title}: mean ± sample std over seeds (faint: single runs)" if title else
                 "mean ± sample std over seeds (faint: single runs)", fontsize=11)
    fig.subplots_adjust(left=0.05, right=0.99, top=0.88, bottom=0.11)
    return _save(fig, out)


def _legend_table(ax, stats: list) -> None:
    """Rows of marker, method and mean ± std of accuracy, DEO_A and DEO_M drawn in axes ``ax``."""
    ax.set_axis_off()
    columns = [(0.07, "method", "left"), (0.58, "accuracy", "right"), (0.80, "DEO_A", "right"), (1.0, "DEO_M", "right")]
    step = min(0.07, 0.93 / max(len(stats), 1))
    y = 0.98
    for x, head, ha in columns:
        ax.text(x, y, head, ha=ha, va="center", fontsize=8, fontweight="bold", transform=ax.transAxes)
    for label, marker, color, row, n in stats:
        y -= step
        ax.plot([0.02], [y], marker=marker, color=color, ms=8, mec="white", mew=0.6, ls="",
                transform=ax.transAxes, clip_on=False)
        cells = [f"{label} ({n})", _fmt(*row["acc"]), _fmt(*row["deo_a"]), _fmt(*row["deo_m"])]
        for (x, _, ha), text in zip(columns, cells):
            ax.text(x, y, text, ha=ha, va="center", fontsize=8, transform=ax.transAxes)
    ax.text(0.0, y - step, "(n): finished runs; values in %", fontsize=7, color="0.4", va="center", transform=ax.transAxes)
