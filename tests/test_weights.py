"""models.weights.load_weights: every source format, prefixes, the head rule and the errors."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fairdistill.errors import ConfigError, RunDirError
from fairdistill.models import HookedModel
from fairdistill.models.weights import load_weights, match_prefix, read_state_dict


class Net(nn.Module):
    def __init__(self, num_classes: int = 3):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


def trained(num_classes: int = 3, seed: int = 1) -> Net:
    torch.manual_seed(seed)
    net = Net(num_classes)
    net.bn.running_mean.normal_()
    return net


def same(a: nn.Module, b: nn.Module, skip: tuple = ()) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return all(torch.equal(sa[k], sb[k]) for k in sa if not k.startswith(skip))


def test_a_prefixed_state_dict_loads_and_the_report_says_so(tmp_path):
    src = trained()
    torch.save({f"module.{k}": v for k, v in src.state_dict().items()}, tmp_path / "w.pth")
    dst = Net()
    report = load_weights(dst, tmp_path / "w.pth", num_classes=3)
    assert same(src, dst)
    assert report == {"source": str(tmp_path / "w.pth"), "prefix_removed": "module.", "loaded": 9,
                      "left_out": [], "reinitialised": []}


def test_wrapped_checkpoints_safetensors_and_hooked_models(tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    src = trained()
    torch.save({"epoch": 3, "state_dict": {f"model.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "c.ckpt")
    save_file(src.state_dict(), str(tmp_path / "w.safetensors"))
    for name in ("c.ckpt", "w.safetensors"):
        hooked = HookedModel(Net(), stages=["bn"], embedding="fc:input")
        load_weights(hooked, tmp_path / name)
        assert same(src, hooked.model)
    torch.save(hooked.state_dict(), tmp_path / "h.pth")  # keys model.conv.weight, ...: fits a plain Net too
    plain = Net()
    assert load_weights(plain, tmp_path / "h.pth")["prefix_removed"] == "model."
    assert same(src, plain)


def test_run_folders_are_read_verified_by_the_engine(tmp_path):
    from fairdistill.engine.build import read_weights

    src = trained()
    run = tmp_path / "run"
    run.mkdir()
    torch.save({"format": 2, "model": src.state_dict(), "checksum": "0" * 64}, run / "checkpoint.pt")
    with pytest.raises(ConfigError, match="is a folder; this reads weight files"):
        load_weights(Net(), run)
    with pytest.raises(ConfigError, match="not a finished run"):
        read_weights(run, "model.weights")
    (run / "result.json").write_text(json.dumps({"final": {}}))
    with pytest.raises(RunDirError, match="not a run directory"):  # the verified reader wants its config.yaml
        read_weights(run, "model.weights")
    dst = Net()  # a checkpoint file itself is read unverified, like any weights file (teacher.checkpoint)
    load_weights(dst, run / "checkpoint.pt")
    assert same(src, dst)


def test_a_head_of_another_size_is_refused_then_reinitialised(tmp_path):
    src = trained(num_classes=1000)
    torch.save(src.state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(ConfigError, match=r"fc.weight \(1000, 4\) in the file, \(5, 4\) in the model.*"
                                          r"model.weights_head=reinit"):
        load_weights(Net(5), tmp_path / "imagenet.pth", num_classes=5)
    torch.manual_seed(7)
    dst = Net(5)
    fresh = {k: v.clone() for k, v in dst.state_dict().items()}
    report = load_weights(dst, tmp_path / "imagenet.pth", num_classes=5, head="reinit")
    assert same(src, dst, skip=("fc.",))
    assert torch.equal(dst.fc.weight, fresh["fc.weight"]) and torch.equal(dst.fc.bias, fresh["fc.bias"])
    assert report["left_out"] == report["reinitialised"] == ["fc.bias", "fc.weight"] and report["loaded"] == 7
    # a backbone file without any head: the head stays as initialised with reinit, is refused without
    torch.save({k: v for k, v in src.state_dict().items() if not k.startswith("fc.")}, tmp_path / "body.pth")
    with pytest.raises(ConfigError, match="missing keys: fc.weight, fc.bias"):
        load_weights(Net(5), tmp_path / "body.pth", num_classes=5)
    assert load_weights(Net(5), tmp_path / "body.pth", num_classes=5, head="reinit")["reinitialised"] == ["fc.bias", "fc.weight"]


def test_other_mismatches_are_refused_even_with_reinit(tmp_path):
    state = trained().state_dict()
    state["extra.weight"] = torch.zeros(2)
    state["conv.weight"] = torch.zeros(4, 3, 5, 5)
    torch.save(state, tmp_path / "odd.pth")
    with pytest.raises(ConfigError, match=r"unexpected keys: extra.weight.*shape mismatches: conv.weight") as err:
        load_weights(Net(), tmp_path / "odd.pth", num_classes=3, head="reinit")
    assert "weights_head" not in str(err.value)


def test_unsafe_or_foreign_files_are_config_errors(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("ran",))

    torch.save({"x": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(ConfigError, match=r"weights_only=True"):
        read_state_dict(tmp_path / "evil.pth", "model.weights")
    torch.save({"a": 1}, tmp_path / "ints.pth")
    with pytest.raises(ConfigError, match="does not hold a state dict"):
        read_state_dict(tmp_path / "ints.pth", "teacher.checkpoint")
    with pytest.raises(ConfigError, match="teacher.checkpoint: no file"):
        read_state_dict(tmp_path / "none.pth", "teacher.checkpoint")
    with pytest.raises(ConfigError, match="model.weights_head: expected one of refuse, reinit"):
        load_weights(Net(), tmp_path / "ints.pth", head="drop")


def test_match_prefix_keeps_keys_that_already_fit():
    own = {"model.a", "model.b"}  # a model whose own top module is called "model"
    state = {"model.a": 0, "model.b": 1}
    assert match_prefix(state, own) == (state, "")
    assert match_prefix({"module._orig_mod.a": 0}, {"a"}) == ({"a": 0}, "module._orig_mod.")
