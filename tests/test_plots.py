"""t-SNE of a run's embeddings (MFD supplement 1.4 settings) and the accuracy-vs-DEO plot."""
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from fairdistill import plots
from fairdistill.cli import main
from fairdistill.config import load_config
from fairdistill.data import BatchLoader, build_dataset
from fairdistill.engine import train
from fairdistill.errors import ConfigError, FairdistillError
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
