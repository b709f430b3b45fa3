"""Every method trains from its config: presets on the embedded data, the OFD-table configs on
CIFAR-format files. One short epoch each; the assertions check what each run must record."""
import glob
import json
import math
import os

import pytest

from fairdistill.config import load_config, stage_list
from fairdistill.engine import train
from fairdistill.config import PRESETS
from fixtures_cifar import make_cifar100

DIGITS = ["progress=false", "epochs=1", "data.batch_size=64", "threads=1"]


def shortened(config, overrides):
    """Overrides that cut every fixed-length pre-stage to one epoch."""
    cfg = load_config(config, overrides)
    return [f"stages.{i}.epochs=1" for i, s in enumerate(cfg.stages) if isinstance(s, dict) and s.get("epochs")]


def check_run(out, cfg):
    result = json.loads((out / "result.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == sum(s.epochs for s in stage_list(cfg))
    for rec, st in zip(lines, [s for s in stage_list(cfg) for _ in range(s.epochs)]):
        active = st.terms if st.terms is not None else list(cfg.terms)
        assert set(active) <= set(rec["train"]), (rec["stage"], active)
        assert all(math.isfinite(v) for v in rec["train"].values())
    f = result["final"]
    assert 0 <= f["accuracy"] <= 1
    if len(result["group_names"]) > 1:
        assert 0 <= f["deo_a"] <= f["deo_m"] <= 1
    else:  # no sensitive attribute (CIFAR-100): no gap between groups can be measured
        assert math.isnan(f["deo_a"]) and math.isnan(f["deo_m"])
    return result


@pytest.fixture(scope="module")
def digits_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("digits") / "teacher"
    train(load_config("configs/digits_s/teacher.yaml", [*DIGITS, f"out={out}"]))
    return out


@pytest.mark.parametrize("method", sorted(set(PRESETS) | {"ss+hkd", "ad+hkd", "ad+fitnet-simul", "mfd+hkd", "ad+mfd"}))
def test_every_preset_trains_on_the_embedded_data(method, digits_teacher, tmp_path):
    base = [*DIGITS, f"method={method}", f"teacher.run={digits_teacher}", f"out={tmp_path / 'run'}"]
    overrides = base + shortened("configs/digits_s/scratch.yaml", base)
    cfg = load_config("configs/digits_s/scratch.yaml", overrides)
    train(cfg)
    check_run(tmp_path / "run", cfg)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    make_cifar100(str(root), train=64, test=20)
    return root


SMALL = ["progress=false", "epochs=1", "data.batch_size=32", "data.eval_batch_size=64", "threads=1"]


@pytest.fixture(scope="module")
def cifar_teacher(cifar_root):
    out = cifar_root / "teacher"
    # a smaller teacher than the paper's WRN-28-4 keeps the test fast; the pairing logic is the same
    train(load_config("configs/cifar100/teacher_wrn28_4.yaml", [*SMALL, f"data.root={cifar_root}", "model.name=wrn-16-2", f"out={out}"]))
    return out


OFD_CONFIGS = sorted(f for f in glob.glob("configs/cifar100/c/*.yaml") if not f.endswith("base.yaml"))


@pytest.mark.parametrize("config", OFD_CONFIGS, ids=os.path.basename)
def test_ofd_table_configs_train_on_cifar_format_files(config, cifar_root, cifar_teacher, tmp_path):
    # a small student; configs with model options (OFD's official_bn_updates) keep their architecture family
    student = ["model.name=wrn", "model.options.depth=10", "model.options.widen_factor=1"] \
        if load_config(config).model.options else ["model.name=resnet20"]
    base = [*SMALL, f"data.root={cifar_root}", *student, f"teacher.run={cifar_teacher}", f"out={tmp_path / 'run'}"]
    overrides = base + shortened(config, base)
    cfg = load_config(config, overrides)
    train(cfg)
    check_run(tmp_path / "run", cfg)
