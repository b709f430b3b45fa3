"""Training curves, t-SNE of a run's embeddings (MFD supplement 1.4 settings), accuracy vs DEO."""
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill import plots
from fairdistill.cli import main
from fairdistill.config import dump_yaml, load_config
from fairdistill.data import BatchLoader, build_dataset
from fairdistill.engine import train
from fairdistill.errors import ConfigError, DataError, FairdistillError
from fairdistill.models import build_model
from fairdistill.engine.checkpoint import load_weights
from fairdistill.rundir import RunDir


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tsne") / "run"
    cfg = load_config(data={"data": {"name": "digits-s", "batch_size": 64}, "model": {"name": "mfd-cnn", "options": {"image_size": 8}},
                            "epochs": 1, "progress": False, "out": str(out), "seed": 1})
    train(cfg)
    return out


def is_png(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as im:
        im.verify()
        return im.size


def test_embeddings_are_the_models_penultimate_features(finished_run):
    emb = plots.run_embeddings(finished_run, max_points=50, seed=3)
    test = build_dataset("digits-s", split="test", seed=1)
    keep = np.sort(np.random.default_rng(3).choice(len(test), 50, replace=False))
    assert emb.features.shape == (50, 256)  # the MFD CNN's fc1 output
    assert np.array_equal(emb.labels, test.labels[keep].numpy()) and np.array_equal(emb.groups, test.groups[keep].numpy())
    # the same numbers from the checkpoint by hand
    model = build_model("mfd-cnn", 10, image_size=8)
    model.load_state_dict(load_weights(RunDir(finished_run).checkpoint))
    model.eval()
    x, _, _ = next(iter(BatchLoader(test.subset(torch.from_numpy(keep)), 64, sampler="sequential").epoch(0)))
    with torch.no_grad():
        expected = model.forward_features(x).embedding.flatten(1).numpy()
    np.testing.assert_allclose(emb.features, expected, rtol=1e-5, atol=1e-6)


def test_tsne_uses_the_supplement_settings(monkeypatch):
    seen = {}

    class Recorder:
        def __init__(self, **kwargs):
            seen.update(kwargs)

        def fit_transform(self, x):
            return np.zeros((len(x), seen["n_components"]))

    monkeypatch.setattr("sklearn.manifold.TSNE", Recorder)
    out = plots.tsne(np.random.default_rng(0).normal(size=(300, 4)))
    assert out.shape == (300, 3)
    iters = seen.pop("max_iter", None) or seen.pop("n_iter")
    assert iters == 250
    assert seen == {"n_components": 3, "perplexity": 200.0, "early_exaggeration": 1.0, "metric": "cosine", "random_state": 5}


def test_tsne_is_deterministic_and_checks_perplexity():
    x = np.random.default_rng(0).normal(size=(40, 6))
    a, b = plots.tsne(x, perplexity=5), plots.tsne(x, perplexity=5)
    assert a.shape == (40, 3) and np.array_equal(a, b)
    with pytest.raises(ConfigError, match=r"perplexity: 200.0 must be smaller than the number of points \(40\)"):
        plots.tsne(x)


def test_tsne_command_draws_a_png(finished_run, tmp_path, capsys):
    png = tmp_path / "t.png"
    assert main(["tsne", str(finished_run), "--out", str(png), "--max-points", "60", "--perplexity", "5"]) == 0
    assert str(png) in capsys.readouterr().out
    w, h = is_png(png)
    assert w > 300 and h > 300
    # too few points for the supplement's perplexity: a clear error, no file
    assert main(["tsne", str(finished_run), "--out", str(tmp_path / "u.png"), "--max-points", "60"]) == 2
    assert "perplexity" in capsys.readouterr().err and not (tmp_path / "u.png").exists()


def test_accuracy_vs_deo_png(tmp_path):
    def res(a, d):
        return {"final": {"accuracy": a, "deo_a": d, "deo_m": 2 * d}}

    out = plots.accuracy_vs_deo([("Teacher", [res(0.8, 0.2), res(0.82, 0.25)]), ("MFD", [res(0.85, 0.05)])],
                                tmp_path / "p.png", title="t")
    w, h = is_png(out)
    assert w > h > 300


def test_missing_matplotlib_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(FairdistillError, match=r"pip install 'fairdistill\[plots\]'"):
        plots.accuracy_vs_deo([], tmp_path / "p.png")


# ----------------------------------------------------------------------------- training curves


def fake_run(path, records, **cfg):
    """A run directory by hand: config.yaml (resolved) and metrics.jsonl."""
    path.mkdir(parents=True)
    (path / "config.yaml").write_text(dump_yaml(load_config(data={"progress": False, **cfg})))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def epoch(e, stage="main", test=True, **train):
    r = {"stage": stage, "epoch": e, "global_epoch": e, "lr": 1e-3, "train": {"loss": 2.0 / e, "ce": 1.0 / e,
                                                                              "accuracy": 0.1 * e, **train}}
    if test:
        r["test"] = {"accuracy": 0.05 * e, "deo_a": 0.3 / e, "deo_m": 0.6 / e, "loss": 1.5 / e, "cell_accuracy": [[0.5]]}
    return r


def capture(monkeypatch):
    """Replace plots._save by a recorder of the drawn figure."""
    figs = []
    monkeypatch.setattr(plots, "_save", lambda fig, out: figs.append(fig) or out)
    return figs


def test_read_metrics_drops_a_truncated_last_line(tmp_path):
    f = tmp_path / "metrics.jsonl"
    lines = [json.dumps(epoch(1)), json.dumps(epoch(2))]
    f.write_text("\n".join(lines) + "\n" + lines[1][:25])  # killed while writing epoch 3
    assert plots.read_metrics(f) == [epoch(1), epoch(2)]
    f.write_text(lines[0] + "\n{broken\n" + lines[1] + "\n")
    with pytest.raises(DataError, match=r"metrics.jsonl, line 2: not a JSON record"):
        plots.read_metrics(f)
    f.write_text("")
    assert plots.read_metrics(f) == []
    with pytest.raises(DataError, match="cannot read"):
        plots.read_metrics(tmp_path / "missing.jsonl")


def test_run_label_names_method_and_seed(tmp_path):
    assert plots.run_label(fake_run(tmp_path / "a", [], method="mfd", name="mfd", seed=2)) == "mfd seed 2"
    assert plots.run_label(fake_run(tmp_path / "b", [], method="ss+hkd", name="ss_hkd")) == "ss+hkd seed 0"
    assert plots.run_label(fake_run(tmp_path / "c", [], name="teacher", seed=1)) == "teacher (scratch) seed 1"
    with pytest.raises(FairdistillError, match="not a run directory"):
        plots.run_label(tmp_path / "nothing")


def test_training_curves_draw_every_runs_records(tmp_path, monkeypatch):
    a = fake_run(tmp_path / "x" / "seed0", [epoch(1, "hint", test=False, fitnet=3.0), epoch(2, "hint", fitnet=2.0),
                                           epoch(3), epoch(4)], name="fitnet", method="fitnet", epochs=2)
    b = fake_run(tmp_path / "y" / "seed1", [epoch(1, test=False), epoch(2), epoch(3)], name="teacher", seed=1)
    figs = capture(monkeypatch)
    plots.training_curves([a, b], tmp_path / "c.png")
    fig = figs[0]
    loss, acc, deo_a, deo_m = fig.axes[:4]
    texts = [t.get_text() for t in fig.legends[0].get_texts()]
    assert texts == ["fitnet seed 0", "teacher (scratch) seed 1"]  # labelled by method and seed
    assert str(tmp_path) not in fig._suptitle.get_text()
    # accuracy: per run the train curve (every epoch) and the test curve (evaluated epochs), x100
    curves = [(tuple(l.get_xdata()), tuple(l.get_ydata()), l.get_color()) for l in acc.lines if l.get_gid() != "stage"]
    assert ((1, 2, 3, 4), tuple(100 * (0.1 * e) for e in (1, 2, 3, 4))) in [c[:2] for c in curves]
    assert ((2, 3), tuple(100 * (0.05 * e) for e in (2, 3))) in [c[:2] for c in curves]
    colors = {c[2] for c in curves}
    assert len(colors) == 2  # one colour per run
    # DEO_M: the test values x100 at the evaluated epochs
    assert [tuple(l.get_ydata()) for l in deo_m.lines if l.get_linestyle() == "-"] == [
        tuple(100 * (0.6 / e) for e in (2, 3, 4)), tuple(100 * (0.6 / e) for e in (2, 3))]
    # loss parts: loss, ce and fitnet of run a; loss and ce of run b; positive values -> log scale
    assert sorted(len(l.get_xdata()) for l in loss.lines if l.get_gid() != "stage") == [2, 3, 3, 4, 4]
    assert loss.get_yscale() == "log"
    # where fitnet's main stage starts
    assert [l.get_xdata()[0] for l in acc.lines if l.get_gid() == "stage"] == [2.5]


def test_plot_command_writes_curves_png(tmp_path, capsys):
    a = fake_run(tmp_path / "r", [epoch(1), epoch(2)])
    assert main(["plot", str(a)]) == 0
    assert str(a / "curves.png") in capsys.readouterr().out
    w, h = is_png(a / "curves.png")
    assert w > h > 500
    assert main(["plot", str(a), str(tmp_path / "none"), "--out", str(tmp_path / "p.png")]) == 2
    assert "not a run directory" in capsys.readouterr().err
    (a / "metrics.jsonl").write_text("")
    assert main(["plot", str(a)]) == 2
    assert "no completed epoch" in capsys.readouterr().err


# ----------------------------------------------------------------------------- t-SNE figure


def test_tsne_figure_colours_groups_and_names_the_run(finished_run, tmp_path, monkeypatch):
    # 2-D points: matplotlib's 3-D scatter reorders its colours by depth when drawn
    monkeypatch.setattr(plots, "tsne", lambda f, **kw: np.random.default_rng(0).normal(size=(len(f), 2)))
    figs = capture(monkeypatch)
    plots.tsne_run(finished_run, tmp_path / "t.png", max_points=80)
    fig = figs[0]
    title = fig._suptitle.get_text()
    assert title.startswith("scratch seed 1: t-SNE") and str(finished_run) not in title and "80 test images" in title
    by_group, by_class = fig.axes[:2]
    emb = plots.run_embeddings(finished_run, max_points=80)
    order = np.random.default_rng(0).permutation(80)
    from matplotlib.colors import to_rgba

    got = by_group.collections[0].get_facecolor()[:, :3]
    want = np.array([to_rgba(plots.GROUP_COLORS[g])[:3] for g in emb.groups[order]])
    np.testing.assert_allclose(got, want)
    assert len(np.unique(by_class.collections[0].get_facecolor()[:, :3], axis=0)) == len(np.unique(emb.labels))
    assert [t.get_text() for t in by_group.get_legend().get_texts()] == [
        f"{name} ({int((emb.groups == g).sum())})" for g, name in enumerate(emb.group_names)]
    assert by_group.collections[0].get_sizes()[0] >= 12  # markers one can see


# ----------------------------------------------------------------------------- accuracy vs DEO


def test_clipped_error_bars():
    assert plots.clipped_err(90.0, 20.0) == [[20.0], [10.0]]
    assert plots.clipped_err(5.0, 8.0) == [[5.0], [8.0]]
    assert plots.clipped_err(50.0, None) is None


def test_accuracy_vs_deo_at_twelve_methods(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    rows = [(f"M{i}", [{"final": {"accuracy": a, "deo_a": d, "deo_m": min(1.0, 2 * d)}}
                       for a, d in zip(rng.uniform(0.4, 0.99, 3), rng.uniform(0.0, 0.6, 3))]) for i in range(12)]
    rows[0] = ("Teacher", [{"final": {"accuracy": 0.99, "deo_a": 0.01, "deo_m": 0.9}},
                           {"final": {"accuracy": 0.6, "deo_a": 0.02, "deo_m": 1.0}}])
    figs = capture(monkeypatch)
    plots.accuracy_vs_deo(rows, tmp_path / "p.png", title="t")
    ax_a, ax_m, table = figs[0].axes
    styles = {(l.get_color(), l.get_marker()) for l in ax_a.lines if l.get_marker() in plots.MARKERS}  # not the caps
    assert len({c for c, _ in styles}) == 12 and len({m for _, m in styles}) == 12
    for ax in (ax_a, ax_m):  # every error bar stays inside [0, 100]
        for coll in ax.collections:
            for seg in getattr(coll, "get_segments", lambda: [])():
                assert np.all(seg >= -1e-9) and np.all(seg <= 100 + 1e-9)
        assert ax.get_xlim()[0] >= -2 and ax.get_ylim()[1] <= 102
    texts = [t.get_text() for t in table.texts]
    acc = np.array([99.0, 60.0])
    assert "Teacher (2)" in texts and f"{acc.mean():.1f} ± {acc.std(ddof=1):.1f}" in texts
    assert all(f"M{i} (3)" in texts for i in range(1, 12))


# ----------------------------------------------------------------------------- report lines


def test_report_says_which_epochs_and_the_time_with_start_up():
    from fairdistill.report import TableRow, describe_epochs, describe_time

    def res(epochs, stages=None, wall=60.0, startup=None):
        r = {"epochs": epochs, "wall_time_s": wall}
        if stages:
            r["stages"] = [{"name": n, "epochs": e} for n, e in stages]
        if startup is not None:
            r["startup_s"] = startup
        return r

    same = [TableRow("Teacher", [res(15), res(15)]), TableRow("MFD", [res(15)])]
    assert describe_epochs(same) == "Every finished run trained 15 epochs."
    mixed = [*same, TableRow("FitNet", [res(23, [("hint", 8), ("main", 15)])]), TableRow("Empty", [])]
    assert describe_epochs(mixed) == "Epochs per run: 15, except FitNet 23 (hint 8 + main 15)."
    assert describe_time([res(15, wall=60, startup=5), res(15, wall=30, startup=4)]) == \
        "Time summed over the 2 finished runs: 1:39 (training 1:30, start-up 0:09)."
    assert describe_time([res(15, wall=60)]) == \
        "Time summed over the 1 finished runs: 1:00 (training only: these runs did not record their start-up)."
    assert describe_time([res(15, wall=60, startup=3), res(15, wall=60)]) == \
        "Time summed over the 2 finished runs: 2:03 (training 2:00; start-up recorded by 1 of them: 0:03)."
