"""The segmentation recipes: the official VOC configs (values, quirks, and their learning rates
per stage and parameter group on tiny models), digits-s-seg from the command line, the dense
report layouts, the digits-s-seg spec and the segmentation demo."""
from __future__ import annotations

import json
import math
import re
import statistics
from pathlib import Path

import pytest

import fairdistill.engine.trainer as trainer_module
from fairdistill.cli import main
from fairdistill.config import load_config
from fairdistill.config.files import read_yaml
from fairdistill.demo import demo_plan
from fairdistill.engine import train
from fairdistill.errors import ConfigError
from fairdistill.report import TableRow, det_table, seg_table
from fairdistill.sweeps import LAYOUTS, load_spec

ROOT = Path(__file__).resolve().parents[1]
VOC = ROOT / "configs" / "voc"
SEG = ROOT / "configs" / "digits_s_seg"
TINY = ["data.options.train_canvases=16", "data.options.test_canvases=4", "data.batch_size=8", "model.options.width=4",
        "epochs=1", "progress=false", "threads=1"]


# ----------------------------------------------------------------------------- configs/voc


@pytest.mark.parametrize("name", ["resnet18_ofd", "mobilenetv2_ofd"])
def test_voc_ofd_configs_are_the_official_recipe_with_every_quirk_on(name):
    cfg = load_config(VOC / f"{name}.yaml")
    d = cfg.data
    assert (d.name, d.batch_size, d.eval_batch_size, d.options["sbd_root"]) == ("voc-seg", 12, 1, "data/benchmark_RELEASE/dataset")
    assert d.augment == {"crop_size": 513, "base_size": 513, "scale_range": [0.5, 2.0], "flip": True, "blur": True,
                         "mask_pad": 0, "eval_size": 513}
    assert cfg.task == {"ce_batch_average": True}
    o, s = cfg.optim, cfg.schedule
    assert (o.name, o.lr, o.momentum, o.nesterov, o.weight_decay) == ("sgd", 0.007, 0.9, True, 5e-4)
    assert o.lr_mult == {"student.aspp": 10, "student.decoder": 10, "terms.ofd": 10}
    assert (s.name, s.unit, s.span, s.power) == ("poly", "iteration", "run", 0.9)
    assert cfg.terms["ofd"]["weight"] == 1e-5 and cfg.terms["ofd"]["dividers"] == [8, 4, 2, 1, 1, 16]
    connectors, main_stage = cfg.stages
    assert (connectors.epochs, connectors.train, connectors.student_mode, connectors.optim) == (1, ["ofd"], "train", {"lr_mult": {}})
    assert main_stage.epochs == 49 and main_stage.train is None
    t = cfg.teacher
    assert (t.bn_mode, t.dropout, t.model.name, t.model.options) == ("train", True, "deeplabv3plus-resnet101",
                                                                      {"aspp_dropout_on_features": False})
    assert cfg.model.options["aspp_dropout_on_features"] is False
    student = "deeplabv3plus-resnet18" if name.startswith("resnet18") else "deeplabv3plus-mobilenetv2"
    assert cfg.model.name == student and cfg.name == name


def test_voc_baselines_and_kd_share_the_recipe_and_differ_only_in_their_term():
    base = load_config(VOC / "base.yaml")
    for name in ("teacher", "resnet18_scratch", "mobilenetv2_scratch", "resnet18_kd", "mobilenetv2_kd"):
        cfg = load_config(VOC / f"{name}.yaml")
        assert (cfg.data, cfg.optim, cfg.schedule, cfg.task, cfg.epochs, cfg.stages) == \
               (base.data, base.optim, base.schedule, base.task, 50, []), name
        assert set(cfg.terms) == ({"kd"} if name.endswith("kd") else set()), name
    kd = load_config(VOC / "mobilenetv2_kd.yaml")
    assert kd.model.name == "deeplabv3plus-mobilenetv2" and kd.terms["kd"]["T"] == 1.0
    assert kd.terms["kd"]["weight"] == pytest.approx(1 / 12, rel=1e-5)  # the CE's weight under the extra /B
    assert load_config(VOC / "teacher.yaml").model.name == "deeplabv3plus-resnet101"


def on_tiny_data(raw: dict, out: Path, **changes) -> dict:
    """A configs/voc recipe with the data swapped for a few digits-s-seg canvases (crops of
    48 px, the rest of data.augment kept) and the model for a width-4 tiny DeepLabV3+."""
    raw = json.loads(json.dumps(raw))
    raw["data"].update(name="digits-s-seg", options={"train_canvases": 24, "test_canvases": 2}, eval_batch_size=4)
    raw["data"]["augment"].update(crop_size=48, base_size=48, eval_size=48)
    flag = raw["model"].get("options", {}).get("aspp_dropout_on_features")
    raw["model"] = {"name": "deeplabv3plus-tiny", "options": {"width": 4, **({} if flag is None else
                                                                              {"aspp_dropout_on_features": flag})}}
    return {**raw, "out": str(out), "progress": False, "threads": 1, **changes}


def test_voc_ofd_recipe_runs_connectors_at_1x_then_head_and_connectors_at_10x(tmp_path, monkeypatch):
    """resnet18_ofd.yaml on tiny models: 2 steps per epoch, stages of 1 + 1 epochs, so the poly
    schedule spans T = 4 iterations. Connector stage: only the connectors, at 0.007 (1 - t/4)^0.9
    (the official 1x quirk); main stage: backbone at that lr, ASPP, decoder and connectors at
    10x, at every step."""
    train(load_config(data=on_tiny_data(read_yaml(VOC / "teacher.yaml"), tmp_path / "teacher", epochs=1)))
    seen = []
    original = trainer_module.train_step

    def spy(run, *args, **kwargs):
        names = {id(p): n for n, p in run.module.named_parameters()}
        seen.append((run.stage.cfg.name, [(g["lr"], [names[id(p)] for p in g["params"]])
                                          for g in run.optimizers[0].param_groups]))
        return original(run, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "train_step", spy)
    raw = on_tiny_data(read_yaml(VOC / "resnet18_ofd.yaml"), tmp_path / "ofd")
    raw["stages"][1]["epochs"] = 1
    raw["teacher"]["run"] = str(tmp_path / "teacher")
    result = train(load_config(data=raw))
    assert [name for name, _ in seen] == ["connectors"] * 2 + ["main"] * 2
    tenfold = ("student.aspp.", "student.decoder.", "objective.terms.ofd.")
    for t, (stage, groups) in enumerate(seen):
        poly = 0.007 * (1 - t / 4) ** 0.9
        if stage == "connectors":
            assert len(groups) == 1 and all(n.startswith("objective.terms.ofd.connectors.") for n in groups[0][1])
            assert groups[0][0] == pytest.approx(poly)
            continue
        names = [n for _, ns in groups for n in ns]
        assert any(n.startswith("student.backbone.") for n in names) and any(n.startswith(tenfold[2]) for n in names)
        for lr, ns in groups:
            mult = {10 if n.startswith(tenfold) else 1 for n in ns}
            assert len(mult) == 1 and lr == pytest.approx(poly * mult.pop()), (t, ns[:2])
    assert [s["name"] for s in result["stages"]] == ["connectors", "main"] and result["task"] == "segmentation"


# ----------------------------------------------------------------------------- digits-s-seg


def test_digits_s_seg_recipes_train_from_the_cli_and_eval_agrees(tmp_path, capsys):
    teacher, student = tmp_path / "teacher", tmp_path / "ofd"
    assert main(["train", str(SEG / "teacher.yaml"), f"out={teacher}", *TINY]) == 0
    assert main(["train", str(SEG / "ofd.yaml"), f"out={student}", f"teacher.run={teacher}", *TINY]) == 0
    capsys.readouterr()
    result = json.loads((student / "result.json").read_text())
    assert result["task"] == "segmentation" and [s["name"] for s in result["stages"]] == ["connectors", "main"]
    assert result["epochs"] == 2 and len(result["final"]["miou_by_group"]) == 2
    records = [json.loads(line) for line in (student / "metrics.jsonl").read_text().splitlines()]
    assert records[0]["train"]["ofd"] > 0 and "ce" in records[1]["train"]
    assert main(["eval", str(student), "--json"]) == 0
    again = json.loads(capsys.readouterr().out)
    for key in ("miou", "miou_gap", "deo_a", "deo_m", "iou_gap_a", "iou_gap_m"):
        assert again[key] == pytest.approx(result["final"][key], nan_ok=True), key


# ----------------------------------------------------------------------------- report layouts


def fake(final: dict) -> dict:
    return {"final": final}


def test_seg_table_means_and_sample_stds_x100_and_leaves_nan_gaps_out():
    keys = LAYOUTS["seg"]
    assert keys == ("miou", "miou_gap", "deo_a", "deo_m", "iou_gap_a", "iou_gap_m")
    runs = [fake(dict(zip(keys, v))) for v in ([0.5, 0.1, 0.2, 0.4, 0.1, 0.3], [0.7, math.nan, 0.4, 0.6, 0.3, 0.5])]
    text, records = seg_table([TableRow("OFD", runs, paper={"miou": 73.98}), TableRow("none", [], missing=["seed 0 failed"])],
                              with_paper=True)
    lines = text.splitlines()
    assert lines[0] == ("| Method | mIoU | (paper) | mIoU gap | (paper) | DEO_A | (paper) | DEO_M | (paper) | IoU gap_A | "
                        "(paper) | IoU gap_M | (paper) | Runs |")
    sd = 100 * statistics.stdev([0.5, 0.7])
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[:5] == ["OFD", f"60.00 ± {sd:.2f}", "73.98", "10.00", ""]  # one defined gap: no std
    assert cells[5] == f"30.00 ± {sd:.2f}" and cells[-1] == "2/2"
    assert records[0]["miou_mean"] == pytest.approx(60.0) and records[0]["miou_gap_std"] is None
    assert records[0]["paper_miou_mean"] == 73.98
    assert [c.strip() for c in lines[3].strip("|").split("|")][1:3] == ["n/a", ""] and records[1]["runs"] == 0


def test_det_table_has_the_detection_columns():
    runs = [fake({"map": 0.8, "map_gap": 0.05, "ap_gap_a": 0.1, "ap_gap_m": 0.2, "deo_a": 0.15, "deo_m": 0.3})]
    text, _ = det_table([TableRow("Teacher", runs)], with_paper=False)
    assert text.splitlines()[0] == "| Method | mAP | mAP gap | AP gap_A | AP gap_M | DEO_A | DEO_M | Runs |"
    assert text.splitlines()[2] == "| Teacher | 80.00 | 5.00 | 10.00 | 20.00 | 15.00 | 30.00 | 1/1 |"


def test_digits_s_seg_spec_loads_with_the_seg_layout(monkeypatch):
    monkeypatch.chdir(ROOT)
    spec = load_spec("specs/digits_s_seg.yaml")
    assert spec.layout == "seg" and [r.name for r in spec.rows] == ["Teacher", "Student (scratch)", "KD", "OFD"]
    assert all(r.teacher == "Teacher" for r in spec.rows[2:]) and spec.rows[1].teacher is None


def test_a_seg_spec_refuses_a_classification_paper_column(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"layout: seg\nrows:\n  - {{name: T, config: {SEG / 'teacher.yaml'}, paper: {{accuracy: 70}}}}\n")
    with pytest.raises(ConfigError, match="accuracy: not a column of the seg layout"):
        load_spec(spec)


# ----------------------------------------------------------------------------- demo


def test_segmentation_demo_trains_its_four_rows_and_tabulates_their_results(tmp_path, capsys):
    """``fairdistill demo --task segmentation`` (its configs: configs/digits_s_seg; the task is checked against the
    folder): the table's cells are the x100 final metrics of the four runs' result.json."""
    out = tmp_path / "demo"
    assert main(["demo", "--task", "segmentation", "--out", str(out), *TINY]) == 0
    printed = capsys.readouterr().out
    assert "digits-s-seg, 1 seed(s), x100, final epoch" in printed
    lines = [line for line in printed.splitlines() if line.startswith("|")]
    assert lines[0] == "| Method | mIoU | mIoU gap | DEO_A | DEO_M | IoU gap_A | IoU gap_M | Runs |"
    for line, row in zip(lines[2:], ["teacher", "scratch", "kd", "ofd"]):
        final = json.loads((out / "segmentation" / row / "seed0" / "result.json").read_text())["final"]
        cells = [c.strip() for c in line.strip("|").split("|")]
        for cell, key in zip(cells[1:7], LAYOUTS["seg"]):
            assert cell == (f"{100 * final[key]:.2f}" if final[key] == final[key] else "n/a"), (row, key)
    assert [c.strip() for c in lines[-1].strip("|").split("|")][0] == "OFD" and len(lines) == 6
    assert not (out / "teacher").exists()  # dense demos keep to OUT/<task>/
    assert main(["demo", "--task", "segmentation", "--out", str(out), *TINY]) == 0  # reuses the finished runs
    again = capsys.readouterr()
    assert [line for line in again.out.splitlines() if line.startswith("|")] == lines and "damaged" not in again.err


DET = ROOT / "configs" / "digits_s_det"


@pytest.mark.skipif(not (DET / "teacher.yaml").is_file(), reason="configs/digits_s_det/ is not here")
def test_detection_demo_plugs_in_by_its_config_folder(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--configs", str(DET), "--out", str(out), *TINY]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    assert lines[0] == "| Method | mAP | mAP gap | AP gap_A | AP gap_M | DEO_A | DEO_M | Runs |"
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["Teacher (scratch)", "Student (scratch)", "OFD"]
    for line, row in zip(lines[2:], ["teacher", "scratch", "ofd"]):
        final = json.loads((out / "detection" / row / "seed0" / "result.json").read_text())["final"]
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == f"{100 * final['map']:.2f}" and cells[5] == f"{100 * final['deo_a']:.2f}", row


def test_demo_plan_finds_the_task_of_a_folder_and_refuses_mismatches(tmp_path):
    folder, task, _, _ = demo_plan(None, "segmentation")
    assert (folder.name, task) == ("digits_s_seg", "segmentation")
    folder, task, rows, data = demo_plan(str(SEG), None)
    assert (task, data, [f for _, f in rows]) == ("segmentation", "digits-s-seg", ["scratch.yaml", "kd.yaml", "ofd.yaml"])
    assert demo_plan(None, None)[1:4:2] == ("classification", "digits-s")
    with pytest.raises(ConfigError, match=re.escape("trains on digits-s, classification data, not segmentation")):
        demo_plan(str(ROOT / "configs" / "digits_s"), "segmentation")
    with pytest.raises(ConfigError, match="--task: unknown task 'seg'"):
        demo_plan(None, "seg")
    (tmp_path / "teacher.yaml").write_text(f"base: {SEG / 'teacher.yaml'}\n")
    with pytest.raises(ConfigError, match="lacks scratch.yaml, kd.yaml, ofd.yaml"):
        demo_plan(str(tmp_path), None)
