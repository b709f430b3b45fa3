"""The speed defaults: the CLI's malloc settings, ``channels_last: auto``, evaluation only when a
metric is used, the MFD CNN's layout-free dropout, and the on-disk cache of the digits sets."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fairdistill import allocator
from fairdistill.data import cache
from fairdistill.engine.defaults import LAYOUT_FAMILIES, family_of, resolve_channels_last
from fairdistill.engine.evaluate import evaluations
from fairdistill.errors import ConfigError
from fairdistill.models import build_model
from fairdistill.models.cifar_cnn import OrderedDropout


# -- allocator ------------------------------------------------------------------------------

def test_allocator_mode_is_checked_and_outside_settings_are_found():
    assert allocator.requested_mode({}) == "tuned"
    assert allocator.requested_mode({"FAIRDISTILL_MALLOC": " System "}) == "system"
    with pytest.raises(ConfigError, match="FAIRDISTILL_MALLOC: expected one of tuned, system"):
        allocator.requested_mode({"FAIRDISTILL_MALLOC": "jemalloc"})
    assert allocator.outside_settings({}) is None
    assert allocator.outside_settings({"MALLOC_ARENA_MAX": "2"}) is None  # not one the tuning sets
    assert allocator.outside_settings({"MALLOC_MMAP_MAX_": "0"}) == "MALLOC_MMAP_MAX_"
    assert allocator.outside_settings({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}) == "GLIBC_TUNABLES"
    assert allocator.outside_settings({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}) is None
    assert allocator.outside_settings({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}) == "LD_PRELOAD"


def _configure_in_child(env: dict) -> str:
    code = "from fairdistill.allocator import configure; print(configure())"
    clean = {k: v for k, v in os.environ.items() if k not in (*allocator.GLIBC_VARIABLES, allocator.ENV, "LD_PRELOAD")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return out.stdout.strip()


@pytest.mark.skipif(not (sys.platform.startswith("linux") and allocator.glibc()), reason="needs Linux with glibc")
def test_configure_applies_the_tuning_unless_told_otherwise():
    assert _configure_in_child({}) == "tuned"
    assert _configure_in_child({"FAIRDISTILL_MALLOC": "system"}) == "system"
    assert _configure_in_child({"MALLOC_TRIM_THRESHOLD_": "1000000"}) == "outside"


def test_a_bad_allocator_mode_is_one_error_line_from_the_cli(tmp_path):
    env = {**os.environ, "FAIRDISTILL_MALLOC": "fast"}
    out = subprocess.run([sys.executable, "-m", "fairdistill", "config", "configs/digits_s/mfd.yaml"], env=env,
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "fairdistill: error: FAIRDISTILL_MALLOC: expected one of tuned, system (tuned: fairdistill's malloc settings; "
        "system: glibc's defaults), got 'fast'"]


# -- memory layout --------------------------------------------------------------------------

def test_channels_last_auto_follows_the_device_and_the_model_families():
    wrn, cnn = build_model("wrn-16-2", 10), build_model("mfd-cnn", 10, image_size=8)
    assert family_of(wrn) == "wrn" and family_of(cnn) == "cifar_cnn"
    assert {"wrn", "cifar_cnn"} <= LAYOUT_FAMILIES
    assert resolve_channels_last("auto", "cpu", [wrn, None]) is True
    assert resolve_channels_last("auto", "cpu", [wrn, cnn]) is True
    assert resolve_channels_last("auto", "cuda", [wrn]) is False  # NCHW off the CPU
    outside = nn.Sequential(nn.Conv2d(3, 4, 3))  # a model from outside the zoo
    assert family_of(outside) is None
    assert resolve_channels_last("auto", "cpu", [wrn, outside]) is False
    assert resolve_channels_last("auto", "cpu", [None]) is False
    assert resolve_channels_last(True, "cuda", [outside]) is True
    assert resolve_channels_last(False, "cpu", [wrn]) is False


def test_ordered_dropout_drops_the_same_units_in_both_layouts_and_equals_dropout_in_nchw():
    x = torch.randn(3, 5, 4, 6)
    drop = OrderedDropout(0.25).train()
    torch.manual_seed(7)
    reference = F.dropout(x, 0.25, training=True)
    torch.manual_seed(7)
    nchw = drop(x)
    torch.manual_seed(7)
    nhwc = drop(x.contiguous(memory_format=torch.channels_last))
    assert torch.equal(nchw, reference) and torch.equal(nhwc, reference)
    kept = reference != 0
    assert torch.allclose(reference[kept], x[kept] / 0.75)  # inverted dropout's scale 1 / (1 - p)
    assert torch.equal(drop.eval()(x), x)


def test_mfd_cnn_trains_alike_in_both_layouts():
    """One SGD step of the MFD CNN (with dropout) in NCHW and in channels-last, same seed: the
    same units are dropped, so the updated weights agree to float rounding."""
    torch.manual_seed(0)
    a = build_model("mfd-cnn", 10, image_size=8).train()
    b = build_model("mfd-cnn", 10, image_size=8).train()
    b.load_state_dict(a.state_dict())
    b.to(memory_format=torch.channels_last)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    for model, inp in ((a, x), (b, x.contiguous(memory_format=torch.channels_last))):
        torch.manual_seed(3)
        F.cross_entropy(model.forward_features(inp).logits, y).backward()
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-6), name


# -- evaluation only when a metric is used --------------------------------------------------

@pytest.mark.parametrize("eval_every, epoch, last, monitor, stage_evaluates, expected", [
    (0, 0, False, None, True, (False, False)),  # nothing reads this epoch's metrics
    (0, 9, True, None, True, (True, True)),  # result.json
    (0, 9, True, None, False, (True, True)),  # evaluate: false still ends with an evaluation
    (0, 3, False, "test_loss", True, (True, True)),  # a plateau schedule on the test loss
    (0, 3, False, "val_loss", True, (False, True)),  # ... on the validation loss
    (2, 0, False, None, True, (False, False)),
    (2, 1, False, None, True, (True, True)),  # every 2nd epoch of the run (1-based epoch 2)
    (2, 1, False, None, False, (False, False)),  # a stage with evaluate: false
    (1, 4, False, None, True, (True, True)),
])
def test_evaluations(eval_every, epoch, last, monitor, stage_evaluates, expected):
    assert evaluations(eval_every, epoch, last, monitor, stage_evaluates) == expected


# -- the data cache -------------------------------------------------------------------------

EXPECTED = {"images": ("uint8", (None, 2)), "mean": ("float64", (3,))}


def _arrays():
    return {"images": np.arange(6, dtype=np.uint8).reshape(3, 2), "mean": np.array([0.1, 0.2, 0.3])}


def test_cache_builds_once_then_reads_the_same_arrays(tmp_path):
    env = {cache.ENV: str(tmp_path)}
    calls = []

    def build():
        calls.append(1)
        return _arrays()

    first = cache.cached("toy", {"a": 1}, EXPECTED, build, environ=env)
    second = cache.cached("toy", {"a": 1}, EXPECTED, build, environ=env)
    assert len(calls) == 1
    for k, v in _arrays().items():
        assert np.array_equal(first[k], v) and np.array_equal(second[k], v) and second[k].dtype == v.dtype
    cache.cached("toy", {"a": 2}, EXPECTED, build, environ=env)  # another key: built again, another file
    assert len(calls) == 2
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".npz", ".npz"]  # no temporary file left


def test_cache_location_follows_the_environment(tmp_path):
    assert cache.cache_dir({cache.ENV: "off"}) is None
    assert cache.cache_dir({cache.ENV: str(tmp_path)}) == tmp_path
    assert cache.cache_dir({"XDG_CACHE_HOME": str(tmp_path)}) == tmp_path / "fairdistill"
    assert cache.cache_dir({"HOME": str(tmp_path)}) == tmp_path / ".cache" / "fairdistill"
    calls = []
    cache.cached("toy", {"a": 1}, EXPECTED, lambda: calls.append(1) or _arrays(), environ={cache.ENV: "off"})
    cache.cached("toy", {"a": 1}, EXPECTED, lambda: calls.append(1) or _arrays(), environ={cache.ENV: "off"})
    assert len(calls) == 2


@pytest.mark.parametrize("damage", ["pickle", "garbage", "other_key", "other_dtype", "other_format"])
def test_a_file_that_is_not_this_cache_is_refused_rebuilt_and_replaced(tmp_path, damage, caplog):
    key = {"a": 1}
    path = cache.cache_path("toy", key, tmp_path)
    if damage == "pickle":  # an object array would run code when unpickled
        np.savez(path, __key__=np.array(cache.key_text(key)), __format__=np.array(cache.FORMAT),
                 images=np.array([{"x": 1}], dtype=object), mean=np.zeros(3))
    elif damage == "garbage":
        path.write_bytes(b"not a zip file")
    else:
        arrays = _arrays()
        text, fmt = cache.key_text(key), cache.FORMAT
        if damage == "other_key":
            text = cache.key_text({"a": 2})
        elif damage == "other_dtype":
            arrays["images"] = arrays["images"].astype(np.int64)
        else:
            fmt = cache.FORMAT + 1
        np.savez(path, __key__=np.array(text), __format__=np.array(fmt), **arrays)
    out = cache.cached("toy", key, EXPECTED, _arrays, environ={cache.ENV: str(tmp_path)})
    assert np.array_equal(out["images"], _arrays()["images"])
    assert "is not a fairdistill cache of this data" in caplog.text
    again = cache.read_arrays(path, key, EXPECTED)  # replaced by a good file
    assert again is not None and np.array_equal(again["images"], _arrays()["images"])


def test_an_unwritable_cache_folder_leaves_the_set_in_memory(tmp_path, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the folder should be
    out = cache.cached("toy", {"a": 1}, EXPECTED, _arrays, environ={cache.ENV: str(blocker / "sub")})
    assert np.array_equal(out["mean"], _arrays()["mean"])
    assert "cannot be written" in caplog.text


def test_digits_s_from_the_cache_equals_the_built_set(tmp_path, monkeypatch):
    from fairdistill.data import digits

    monkeypatch.setenv(cache.ENV, str(tmp_path))
    digits.rendered.cache_clear()
    built = digits.digits_s(split="train", seed=1, skew=0.9)
    assert len(list(tmp_path.glob("digits-s-train-*.npz"))) == 1
    read = digits.digits_s(split="train", seed=1, skew=0.9)
    assert torch.equal(built.images, read.images) and torch.equal(built.groups, read.groups)
    assert built.mean == read.mean and built.std == read.std
    monkeypatch.setenv(cache.ENV, "off")
    fresh = digits.digits_s(split="train", seed=1, skew=0.9)
    assert torch.equal(fresh.images, built.images) and torch.equal(fresh.labels, built.labels)
    stored = np.load(next(tmp_path.glob("digits-s-train-*.npz")), allow_pickle=False)
    key = json.loads(str(stored["__key__"]))
    assert key["seed"] == 1 and key["skew"] == 0.9 and key["version"] == digits.VERSION


def test_a_channels_last_run_stores_standard_layout_weights_and_evaluates_in_its_layout(tmp_path):
    from pathlib import Path

    from fairdistill.config import load_config
    from fairdistill.engine import train
    from fairdistill.engine.build import load_run_model
    from fairdistill.engine.evaluate import evaluate_run
    from fairdistill.packaged import packaged_dir

    cfg = load_config(Path(packaged_dir("configs")) / "digits_s/scratch.yaml",
                      ["epochs=1", "progress=false", "channels_last=auto", f"out={tmp_path / 'run'}"])
    result = train(cfg)
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    assert all(v.is_contiguous() for v in state.values())  # exportable (safetensors refuses strided tensors)
    run = load_run_model(tmp_path / "run")
    assert run.model.conv2.weight.is_contiguous(memory_format=torch.channels_last)  # auto on the CPU: NHWC
    assert evaluate_run(str(tmp_path / "run"))["accuracy"] == result["final"]["accuracy"]
