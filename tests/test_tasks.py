"""The task layer: losses and counts per task, iteration stages and schedules, learning-rate
groups, stage modes, and the dense tasks trained end to end from a config."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from fairdistill.config import ScheduleConfig, load_config
from fairdistill.engine import train
from fairdistill.engine.stages import lr_groups, make_optimizer, scheduled_lr
from fairdistill.errors import ConfigError
from fairdistill.methods.kd import kd_loss
from fairdistill.tasks import TASKS, task_of

TINY_SEG = {
    "data": {"name": "digits-s-seg", "batch_size": 8, "eval_batch_size": 32,
             "options": {"train_canvases": 24, "test_canvases": 8}},
    "model": {"name": "deeplabv3plus-tiny", "options": {"width": 4}},
    "optim": {"name": "sgd", "lr": 0.01, "nesterov": True},
    "epochs": 2, "progress": False, "threads": 1,
}


def seg_config(tmp_path, name="run", **changes):
    data = json.loads(json.dumps(TINY_SEG))
    for k, v in changes.items():
        data[k] = v
    return load_config(data={**data, "out": str(tmp_path / name)})


def test_task_of_data_sets():
    assert task_of("digits-s") == "classification"
    assert task_of("voc-seg") == task_of("digits-s-seg") == "segmentation"
    assert task_of("voc-det") == task_of("coco-det") == task_of("digits-s-det") == "detection"


def test_segmentation_loss_ignores_void_and_can_average_over_the_batch_again():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 4, 4, generator=g)
    target = torch.randint(0, 5, (3, 4, 4), generator=g)
    target[0, 0] = 255
    valid = target != 255
    # independent: mean over valid pixels of -log softmax at the target class
    logp = logits.log_softmax(1).permute(0, 2, 3, 1)[valid]
    expected = -logp.gather(1, target[valid][:, None]).mean()
    seg = TASKS.get("segmentation")()
    assert torch.allclose(seg.loss(logits, target, None)["ce"], expected)
    assert torch.allclose(TASKS.get("segmentation")(ce_batch_average=True).loss(logits, target, None)["ce"], expected / 3)
    counts = seg.train_counts(logits, target)
    assert counts["total"] == valid.sum() and counts["correct"] == ((logits.argmax(1) == target) & valid).sum()


def test_per_pixel_kd_is_the_mean_of_per_pixel_kl():
    g = torch.Generator().manual_seed(1)
    s, t = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    flat = lambda z: z.permute(0, 2, 3, 1).reshape(-1, 4)  # noqa: E731
    expected = F.kl_div(F.log_softmax(flat(s) / 2, 1), F.softmax(flat(t) / 2, 1), reduction="batchmean") * 4
    assert torch.allclose(kd_loss(s, t, T=2.0), expected, atol=1e-6)


def test_poly_and_iteration_multistep_against_the_formulas():
    poly = ScheduleConfig(name="poly", unit="iteration", power=0.9)
    assert scheduled_lr(poly, 0.007, 0, 100) == 0.007
    assert scheduled_lr(poly, 0.007, 37, 100) == pytest.approx(0.007 * (1 - 37 / 100) ** 0.9)
    steps = ScheduleConfig(name="multistep", unit="iteration", milestones=[80000, 100000], gamma=0.1)
    assert [scheduled_lr(steps, 1e-3, t, 120000) for t in (79999, 80000, 100000)] == pytest.approx([1e-3, 1e-4, 1e-5])


def test_lr_groups_by_longest_prefix_and_unknown_prefix_named():
    a, b, c = (torch.nn.Parameter(torch.zeros(1)) for _ in range(3))
    named = [("student.backbone.w", a), ("student.aspp.w", b), ("terms.ofd.connectors.0.w", c)]
    groups = lr_groups(named, {"student.aspp": 10.0, "terms.ofd": 10.0, "student": 2.0}, "optim.lr_mult")
    opt = make_optimizer(groups, load_config(data={"optim": {"name": "sgd", "lr": 0.007}}).optim)
    lrs = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
    assert lrs == {id(a): pytest.approx(0.014), id(b): pytest.approx(0.07), id(c): pytest.approx(0.07)}
    assert lr_groups(named, {}, "k") == [a, b, c]
    with pytest.raises(ConfigError, match="'student.asp' names no trained parameter"):
        lr_groups(named, {"student.asp": 10.0}, "optim.lr_mult")


def test_a_label_term_is_refused_on_dense_data_before_any_data_is_read(tmp_path):
    data = {**TINY_SEG, "method": "mfd", "data": {**TINY_SEG["data"], "root": str(tmp_path / "missing")}}
    with pytest.raises(ConfigError, match="terms.mfd: mfd works on classification data"):
        load_config(data=data)


def test_iteration_stages_and_per_iteration_poly(tmp_path):
    """8 steps per epoch: a 3-iteration stage is one cut-short epoch, an 11-iteration stage two
    epochs (8 + 3); the poly schedule spans both stages and the lr after each epoch is the
    formula's at that epoch's last step."""
    cfg = seg_config(tmp_path, data={**TINY_SEG["data"], "batch_size": 3},
                     schedule={"name": "poly", "unit": "iteration", "span": "run"},
                     stages=[{"name": "a", "iterations": 3}, {"name": "b", "iterations": 11}])
    result = train(cfg)
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["epoch"]) for r in records] == [("a", 1), ("b", 1), ("b", 2)]
    last_steps = [2, 3 + 7, 3 + 10]
    for r, t in zip(records, last_steps):
        assert r["lr"] == pytest.approx(0.01 * (1 - t / 14) ** 0.9)
    assert result["epochs"] == 3 and result["task"] == "segmentation"
    assert set(result["final"]) >= {"miou", "miou_by_group", "deo_a", "deo_m", "iou_gap_a", "iou_gap_m", "loss"}
    assert len(result["iou_by_group"]) == 2 and len(result["iou_by_group"][0]) == 11


def test_connector_stage_moves_student_bn_statistics_but_not_its_weights(tmp_path):
    teacher = seg_config(tmp_path, "teacher", epochs=1)
    train(teacher)
    cfg = seg_config(tmp_path, method="ofd", epochs=1, teacher={"run": str(tmp_path / "teacher"), "bn_mode": "train"},
                     terms={"ofd": {"weight": 1e-5, "dividers": [2, 1, 2, 2, 2, 4]}},
                     stages=[{"name": "connectors", "train": ["ofd"], "student_mode": "train"}])
    from fairdistill.engine import Trainer

    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.student.state_dict().items()}
    trainer.run()
    after = trainer.student.state_dict()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    assert moved and all(k.endswith(("running_mean", "running_var", "num_batches_tracked")) for k in moved)


def test_detection_trains_from_a_config_and_reports_group_ap(tmp_path):
    cfg = load_config(data={
        "data": {"name": "digits-s-det", "batch_size": 8, "eval_batch_size": 32,
                 "options": {"train_canvases": 16, "test_canvases": 6}, "augment": {"size": 64, "ssd": {}}},
        "model": {"name": "ssd-tiny", "options": {"width": 4}},
        "optim": {"name": "sgd", "lr": 1e-3}, "stages": [{"iterations": 3}], "progress": False, "threads": 1,
        "out": str(tmp_path / "det"),
    })
    result = train(cfg)
    assert result["task"] == "detection" and result["epochs"] == 2
    assert set(result["final"]) >= {"map", "map_by_group", "ap_gap_a", "ap_gap_m", "deo_a", "deo_m", "loss"}
    assert len(result["final"]["map_by_group"]) == 2 and math.isfinite(result["final"]["loss"])
    record = json.loads((tmp_path / "det" / "metrics.jsonl").read_text().splitlines()[0])
    assert {"loc", "conf", "loss"} <= set(record["train"])


@pytest.mark.parametrize("task, head", [("classification", "accuracy"), ("segmentation", "miou"), ("detection", "map"),
                                        (None, "accuracy")])
def test_a_finished_run_reads_back_by_its_tasks_headline_metric(tmp_path, task, head):
    """result.json's ``final`` must hold the task's headline metric in [0, 1] (a run of a dense
    task has no accuracy; one written before the task layer has no ``task``)."""
    from fairdistill.errors import RunDirError
    from fairdistill.rundir import RunDir

    rd = RunDir(tmp_path)

    def write(final, **extra):
        body = {"final": final, **({"task": task} if task else {}), **extra}
        (tmp_path / "result.json").write_text(json.dumps(body))

    write({head: 0.5, "deo_a": 0.1, "deo_m": 0.2})
    assert rd.read_result()["final"][head] == 0.5
    write({head: 1.5, "deo_a": 0.1, "deo_m": 0.2})
    with pytest.raises(RunDirError, match=rf"damaged \(final {head} 1.5 is outside \[0, 1\]\)"):
        rd.read_result()
    write({"deo_a": 0.1, "deo_m": 0.2})
    with pytest.raises(RunDirError, match=rf"final {head} is None"):
        rd.read_result()
    write({head: 0.5, "deo_a": 0.1, "deo_m": 0.2}, task="pose")
    with pytest.raises(RunDirError, match="unknown task 'pose'"):
        rd.read_result()
