"""Open inputs end to end: a user's module as teacher and student (plugins + module:factory)
through OFD, MFD (with its connector), eval, tsne and a sweep of child processes; initial
weights from a run, a prefixed state dict and a safetensors file; imagecsv groups in
result.json; packaged configs from another folder; an empty config."""
from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from fairdistill.cli import main
from fairdistill.config import load_config
from fairdistill.engine import evaluate_run, train
from fairdistill.errors import ConfigError
from fairdistill.packaged import find_dir, find_file, packaged_dir

TINY = ["epochs=1", "progress=false", "data.batch_size=128", "threads=1"]

PLUGIN = '''
"""A user's models: a torchvision-style ResNet (one in-place ReLU module per block, used twice)."""
import torch
from torch import nn

from fairdistill.models import MODELS


class Block(nn.Module):
    def __init__(self, inp, out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(inp, out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out, out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out)
        self.down = nn.Sequential(nn.Conv2d(inp, out, 1, stride, bias=False), nn.BatchNorm2d(out))

    def forward(self, x):
        out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
        out += self.down(x)
        return self.relu(out)


class Net(nn.Module):
    def __init__(self, num_classes, width=8):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(Block(width, width, 1))
        self.layer2 = nn.Sequential(Block(width, 2 * width, 2))
        self.layer3 = nn.Sequential(Block(2 * width, 2 * width, 1))
        self.layer4 = nn.Sequential(Block(2 * width, 4 * width, 2))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class Failing(Net):
    def forward(self, x):
        if self.training:
            raise RuntimeError("a bug in the user's model")
        return super().forward(x)


def make_net(num_classes: int, width: int = 8, fail_in_training: bool = False) -> nn.Module:
    return (Failing if fail_in_training else Net)(num_classes, width)


@MODELS.register("plugin-net")
def plugin_net(num_classes: int, width: int = 4) -> nn.Module:
    return Net(num_classes, width)
'''


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A folder holding the user's module ``user_nets.py`` (imported from the working directory)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "user_nets.py").write_text(PLUGIN)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def result(run) -> dict:
    return json.loads((Path(run) / "result.json").read_text())


def user_configs(folder: Path) -> dict[str, Path]:
    """Teacher: import path; students: the plugin's registered name (it exists only after the
    plugin is imported), so every process that builds them must import ``plugins``."""
    base = {"data": {"name": "digits-s"}, "plugins": ["user_nets"], "epochs": 1}
    return {
        "teacher": write_yaml(folder / "teacher.yaml", {**base, "model": {"name": "user_nets:make_net"}}),
        "ofd": write_yaml(folder / "ofd.yaml", {**base, "method": "ofd", "model": {"name": "plugin-net"}}),
        "mfd": write_yaml(folder / "mfd.yaml", {**base, "method": "mfd", "model": {"name": "plugin-net"},
                                                "terms": {"mfd": {"connector": "linear"}}}),
    }


def test_user_models_distil_with_ofd_and_mfd_then_eval_and_tsne(workdir, capsys):
    files = user_configs(workdir)
    train(load_config(files["teacher"], [*TINY, "out=runs/t"]))
    cfg = load_config(files["ofd"], [*TINY, "teacher.run=runs/t", "out=runs/ofd"])
    from fairdistill.engine import Trainer

    trainer = Trainer(cfg)
    # OFD's margins come from the BN before each block's final ReLU (found by prerelu: bn2)
    bns = trainer.teacher.stage_bns()
    assert [b is trainer.teacher.model.get_submodule(f"layer{i}.0.bn2") for i, b in enumerate(bns, 1)] == [True] * 4
    assert len(trainer.objective.term("ofd").connectors) == 4  # student width 4 -> teacher width 8
    trainer.run()
    train(load_config(files["mfd"], [*TINY, "teacher.run=runs/t", "out=runs/mfd"]))
    for run in ("runs/ofd", "runs/mfd"):
        r = result(run)
        assert 0.0 <= r["final"]["accuracy"] <= 1.0 and r["group_names"] == ["gray", "color"]
    # eval and tsne rebuild the plugin's model from the run folder
    again = evaluate_run("runs/ofd")
    assert again["accuracy"] == pytest.approx(result("runs/ofd")["final"]["accuracy"])
    assert main(["tsne", "runs/mfd", "--out", "t.png", "--max-points", "60", "--perplexity", "5"]) == 0
    assert (workdir / "t.png").stat().st_size > 1000


def test_mfd_needs_its_connector_between_widths(workdir):
    files = user_configs(workdir)
    train(load_config(files["teacher"], [*TINY, "out=runs/t"]))
    with pytest.raises(ConfigError, match=r"mfd: the student's embedding has 16 values.*teacher's 32.*connector=linear"):
        train(load_config(files["mfd"], [*TINY, "teacher.run=runs/t", "out=runs/m", "terms.mfd.connector=none"]))


def test_a_run_that_failed_before_its_first_epoch_can_be_retried(workdir):
    files = user_configs(workdir)
    with pytest.raises(RuntimeError, match="a bug in the user's model"):
        train(load_config(files["teacher"], [*TINY, "out=runs/t", "model.options.fail_in_training=true"]))
    assert (workdir / "runs/t/config.yaml").is_file() and not (workdir / "runs/t/checkpoint.pt").exists()
    assert main(["train", str(files["teacher"]), *TINY, "out=runs/t"]) == 0  # not blocked by the failed start


def test_a_sweep_of_user_models_imports_the_plugin_in_every_child(workdir):
    from fairdistill.sweeps import load_spec, run_sweep

    files = user_configs(workdir)
    scratch = write_yaml(workdir / "scratch.yaml", {**yaml.safe_load(files["ofd"].read_text()), "method": "scratch"})
    spec = write_yaml(workdir / "spec.yaml", {
        "name": "user", "layout": "mfd", "out": "sweep", "seeds": [0], "jobs": 2, "overrides": TINY,
        "rows": [{"name": "Teacher", "config": str(files["teacher"])}, {"name": "Plugin", "config": str(scratch)}]})
    summary = run_sweep(load_spec(spec), stream=io.StringIO())
    assert summary.ok, (workdir / "sweep/plugin/seed0/train.log").read_text()[-2000:]
    # "plugin-net" exists only in a process that imported the plugin
    assert result("sweep/plugin/seed0")["model"] == "plugin-net"
    assert result("sweep/teacher/seed0")["model"] == "user_nets:make_net"


def test_the_mfd_connector_is_a_linear_map_trained_with_the_student():
    from fairdistill.methods.base import SetupContext, TermInput
    from fairdistill.methods.mfd import MFD, mmd_loss
    from fairdistill.models.base import Features

    torch.manual_seed(0)
    s, t = torch.randn(12, 5, requires_grad=True), torch.randn(12, 9)
    y, g = torch.arange(12) % 3, torch.arange(12) % 2
    term = MFD(connector="linear")
    feats = lambda e: Features(logits=None, stages=[], embedding=e)  # noqa: E731
    term.setup(SetupContext(teacher=None, student_features=feats(s.detach()), teacher_features=feats(t),
                            num_classes=3, num_groups=2, device=torch.device("cpu")))
    assert isinstance(term.connector, torch.nn.Linear) and term.connector.weight.shape == (9, 5)
    loss = term(TermInput(x=None, y=y, g=g, student=feats(s), teacher=feats(t)))
    torch.testing.assert_close(loss, 0.5 * mmd_loss(term.connector(s), t, y, g, num_classes=3, num_groups=2))
    loss.backward()
    assert term.connector.weight.grad.abs().sum() > 0 and s.grad.abs().sum() > 0
    maps = MFD(connector="linear")
    maps.setup(SetupContext(teacher=None, student_features=feats(torch.zeros(2, 4, 3, 3)),
                            teacher_features=feats(torch.zeros(2, 8, 3, 3)), num_classes=3, num_groups=2,
                            device=torch.device("cpu")))
    assert isinstance(maps.connector, torch.nn.Conv2d) and maps.connector.kernel_size == (1, 1)


def test_a_plugin_that_fails_is_a_config_error_naming_it(workdir):
    (workdir / "broken.py").write_text("import torch\n\nraise RuntimeError('no GPU driver')\n")
    with pytest.raises(ConfigError, match=r"plugins\[0\]: no module named 'nowhere'"):
        load_config(data={"plugins": ["nowhere"]})
    with pytest.raises(ConfigError, match=r"plugins\[1\]: importing 'broken' raised RuntimeError: no GPU driver "
                                          r"\(at .*broken.py:3\)"):
        load_config(data={"plugins": ["user_nets", "broken"]})
    with pytest.raises(ConfigError, match=r"model.name: 'user_nets' has no attribute 'make_nett'. Did you mean 'make_net'"):
        load_config(data={"model": {"name": "user_nets:make_nett"}})
    with pytest.raises(ConfigError, match=r"model.options.depth: unknown option.*Valid options: width"):
        load_config(data={"model": {"name": "user_nets:make_net", "options": {"depth": 3}}})


@pytest.mark.parametrize("package", ["torchvision", "timm"])
def test_torchvision_and_timm_shortcuts(package):
    try:
        __import__(package)
    except Exception:
        with pytest.raises(ConfigError, match=rf"'{package}:resnet18' needs {package}, which cannot be imported"):
            load_config(data={"model": {"name": f"{package}:resnet18"}})
        pytest.skip(f"{package} does not import here")
    from fairdistill.models import build_model

    model = build_model(f"{package}:resnet18", 10, input_shape=(3, 32, 32))
    assert [str(p) for p in model.stage_points][-1].endswith("relu:input (call 2 of 2)") or package == "timm"
    assert model.forward_features(torch.zeros(2, 3, 32, 32)).logits.shape == (2, 10)
    with pytest.raises(ConfigError, match="nothing is downloaded"):
        load_config(data={"model": {"name": f"{package}:resnet18",
                                    "options": {"weights" if package == "torchvision" else "pretrained": True}}})


# ----------------------------------------------------------------------------- weights


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    cfg = load_config(Path(packaged_dir("configs")) / "digits_s/teacher.yaml", [*TINY, "epochs=3", f"out={out}"])
    train(cfg)
    return out


def test_a_student_from_its_teachers_weights_evaluates_at_the_teachers_accuracy(teacher_run, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    state = torch.load(teacher_run / "checkpoint.pt", weights_only=True)["model"]
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "prefixed.pth")
    save_file(state, str(tmp_path / "t.safetensors"))
    want = result(teacher_run)["final"]["accuracy"]
    for i, source in enumerate([teacher_run, tmp_path / "prefixed.pth", tmp_path / "t.safetensors"]):
        out = tmp_path / f"s{i}"
        cfg = load_config(Path(packaged_dir("configs")) / "digits_s/scratch.yaml",
                          [*TINY, f"model.weights={source}", "optim.lr=1e-12", f"out={out}"])
        r = train(cfg)
        assert r["final"]["accuracy"] == want
        assert r["weights"]["student"]["loaded"] == len(state) and r["weights"]["student"]["left_out"] == []
        assert r["weights"]["student"]["prefix_removed"] == ("module." if i == 1 else "")
    # the teacher gets the same loader: a prefixed checkpoint file with teacher.model
    cfg = load_config(Path(packaged_dir("configs")) / "digits_s/hkd.yaml",
                      [*TINY, f"teacher.checkpoint={tmp_path / 'prefixed.pth'}", "teacher.model.name=mfd-cnn",
                       f"out={tmp_path / 'hkd'}"])
    assert train(cfg)["weights"]["teacher"]["prefix_removed"] == "module."


def test_a_head_of_another_size_needs_weights_head_reinit(teacher_run, tmp_path):
    state = torch.load(teacher_run / "checkpoint.pt", weights_only=True)["model"]
    state["last.weight"], state["last.bias"] = torch.zeros(1000, 256), torch.zeros(1000)
    torch.save(state, tmp_path / "wide.pth")
    overrides = [*TINY, f"model.weights={tmp_path / 'wide.pth'}"]
    scratch = Path(packaged_dir("configs")) / "digits_s/scratch.yaml"
    with pytest.raises(ConfigError, match=r"last.weight \(1000, 256\) in the file, \(10, 256\).*weights_head=reinit"):
        train(load_config(scratch, [*overrides, f"out={tmp_path / 'a'}"]))
    r = train(load_config(scratch, [*overrides, "model.weights_head=reinit", f"out={tmp_path / 'a'}"]))
    assert r["weights"]["student"]["reinitialised"] == ["last.bias", "last.weight"]


# ----------------------------------------------------------------------------- data, packaging, defaults


def test_imagecsv_intersectional_groups_reach_result_json(tmp_path):
    from PIL import Image

    rows = ["path,label,race,gender,split"]
    gen = torch.Generator().manual_seed(0)
    for i in range(48):
        race, gender = ("b", "w")[i % 2], ("f", "m")[(i // 2) % 2]
        label = i % 3
        arr = (torch.rand(8, 8, 3, generator=gen) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,c{label},{race},{gender},{'test' if i >= 36 else 'train'}")
    (tmp_path / "faces.csv").write_text("\n".join(rows) + "\n")
    cfg = load_config(data={"data": {"name": "imagecsv", "root": str(tmp_path), "batch_size": 12,
                                     "options": {"csv": "faces.csv", "group": ["race", "gender"], "image_size": 8}},
                            "epochs": 1, "progress": False, "out": str(tmp_path / "run")})
    r = train(cfg)
    assert r["group_names"] == ["b/f", "b/m", "w/f", "w/m"] and r["class_names"] == ["c0", "c1", "c2"]
    assert len(r["cell_accuracy"]) == 4 and len(r["cell_accuracy"][0]) == 3


def test_packaged_configs_and_specs_are_found_from_another_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert find_file("cifar10s/mfd") == packaged_dir("configs") / "cifar10s/mfd.yaml"
    assert find_file("configs/digits_s/teacher.yaml") == packaged_dir("configs") / "digits_s/teacher.yaml"
    assert find_file("digits_s_mfd", "specs") == packaged_dir("specs") / "digits_s_mfd.yaml"
    assert find_dir("configs/digits_s") == packaged_dir("configs") / "digits_s"
    assert find_file("nowhere/x") == Path("nowhere/x")
    cfg = load_config("cifar10s/mfd")  # its base: base.yaml resolves beside the packaged file
    assert (cfg.name, cfg.data.name, cfg.model.name) == ("mfd", "cifar10s", "mfd-cnn")
    (tmp_path / "cifar10s").mkdir()
    write_yaml(tmp_path / "cifar10s/mfd.yaml", {"epochs": 3})  # an existing path always wins
    assert load_config("cifar10s/mfd.yaml").epochs == 3
    assert main(["train", "digits_s/teacher", *TINY, "out=runs/t"]) == 0
    assert result("runs/t")["data"] == "digits-s"
    from fairdistill.sweeps import load_spec

    spec = load_spec("digits_s_mfd")  # every row's configs/digits_s/... is found in the package too
    assert spec.name == "digits_s_mfd" and len(spec.rows) > 5


def test_an_empty_config_trains(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty.yaml").write_text("")
    assert main(["train", "empty.yaml", *TINY, "out=runs/e"]) == 0
    r = result("runs/e")
    assert r["model"] == "mfd-cnn" and r["data"] == "digits-s"


def test_teacher_model_weights_is_refused():
    with pytest.raises(ConfigError, match="teacher.model.weights: .*teacher.checkpoint"):
        load_config(data={"teacher": {"checkpoint": "t.pth", "model": {"name": "mfd-cnn", "weights": "x.pth"}}})


def test_a_stage_list_of_user_positions_from_yaml(workdir):
    text = textwrap.dedent("""
        plugins: [user_nets]
        model:
          name: user_nets:make_net
          features: {stages: [layer2, layer4], embedding: "avgpool", prerelu: false}
    """)
    (workdir / "p.yaml").write_text(text)
    cfg = load_config(workdir / "p.yaml")
    assert cfg.model.features.stages == ["layer2", "layer4"] and cfg.model.features.prerelu is False
    with pytest.raises(ConfigError, match=r"model.features.stagez: unknown key"):
        load_config(workdir / "p.yaml", ["model.features.stagez=[a]"])
