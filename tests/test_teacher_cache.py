"""The teacher cache (engine/teacher_cache.py) and the terms' teacher-field declarations.

Pinned: served features equal the teacher's computed ones bit for bit (both views of flipped
data, channels-last); a run's result.json and metrics.jsonl are identical with the cache on and
off; a stored cache is reused, rebuilt when its values differ, and keyed by what determines
them (the teacher's weights, another teacher, the data options); ``on`` is refused naming the
reason where the cache cannot be exact, and ``auto`` then runs the teacher; a term reads only
the teacher fields it declares, and every built-in term declares all it reads.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from fairdistill.config import load_config
from fairdistill.engine import train
from fairdistill.engine.teacher_cache import CACHE_DIR, _key, batch_items, config_refusals
from fairdistill.engine.trainer import Trainer
from fairdistill.errors import ConfigError, TrainingError
from fairdistill.methods import TERMS
from fairdistill.methods.base import Term
from fairdistill.methods.fields import DeclaredFeatures, field_value, stage_field
from fairdistill.methods.objective import Objective
from fairdistill.models import FeatureNotComputed, Features, build_model
from test_methods_fakes import TinyNet, make_ctx, make_input

ROOT = Path(__file__).resolve().parents[1]
QUICK = ["progress=false", "epochs=1", "data.batch_size=64", "threads=1", "data.flip=true"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "teacher"
    train(load_config(ROOT / "configs/digits_s/teacher.yaml", [*QUICK[:-1], f"out={out}"]))
    return out


def student_cfg(teacher, out, *extra, method="mfd"):
    return load_config(ROOT / "configs/digits_s/scratch.yaml",
                       [*QUICK, f"method={method}", f"teacher.run={teacher}", f"out={out}", *extra])


def run_files(out: Path) -> tuple[dict, list]:
    result = json.loads((out / "result.json").read_text())
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return result["final"], [r["train"] | {"test": r.get("test")} for r in lines]


# ----------------------------------------------------------------------------- exactness


def test_served_features_equal_the_teachers_bit_for_bit_in_both_views(teacher, tmp_path):
    trainer = Trainer(student_cfg(teacher, tmp_path / "run", "teacher.cache=on", "channels_last=true", method="at"))
    cache, loader = trainer.teacher_cache, trainer.data.train_loader
    assert cache is not None and cache.views == 2 and trainer.stages[0].index in cache.stages
    fields = sorted(cache.fields)
    assert fields == [stage_field("block", i) for i in range(3)]  # the at preset: every block output
    trainer.teacher.eval()
    flipped = 0
    for (x, y, _), (items, flips) in zip(loader.epoch(3), batch_items(loader, 3)):
        served = cache.features(items, flips, y)
        with torch.no_grad():
            computed = trainer.teacher.forward_features(trainer.precision.input(x))
        for name in fields:
            a, b = field_value(served, name), field_value(computed, name)
            assert torch.equal(a, b) and a.is_contiguous(memory_format=torch.channels_last)
        flipped += int(flips.sum())
    assert flipped > 0
    with pytest.raises(FeatureNotComputed, match="teacher cache does not hold it"):
        served.embedding


@pytest.mark.parametrize("method,extra", [("mfd", []), ("fitnet", []), ("nst", ["terms.nst.feature=stage"])])
def test_a_run_has_the_same_metrics_with_the_cache_on_and_off(teacher, tmp_path, method, extra, capsys):
    runs = {}
    for mode in ("on", "off"):
        out = tmp_path / mode
        train(student_cfg(teacher, out, f"teacher.cache={mode}", *extra, method=method))
        runs[mode] = run_files(out)
    assert runs["on"] == runs["off"]
    assert "run no teacher forward" in capsys.readouterr().out


def test_the_stored_cache_is_reused_and_rebuilt_when_its_values_differ(teacher, tmp_path, capsys):
    shutil.rmtree(teacher / CACHE_DIR, ignore_errors=True)  # what earlier tests stored
    train(student_cfg(teacher, tmp_path / "a", "teacher.cache=on"))
    assert "built in" in capsys.readouterr().out
    (folder,) = (teacher / CACHE_DIR).iterdir()
    assert sorted(p.name for p in folder.iterdir()) >= ["embedding.npy", "key.json"]
    train(student_cfg(teacher, tmp_path / "b", "teacher.cache=on"))
    assert ", read (" in capsys.readouterr().out
    import numpy as np

    stored = np.load(folder / "embedding.npy", allow_pickle=False)
    np.save(folder / "embedding.npy", stored + 1.0, allow_pickle=False)  # a stale file under the same key
    train(student_cfg(teacher, tmp_path / "c", "teacher.cache=on"))
    assert "built in" in capsys.readouterr().out
    assert run_files(tmp_path / "a") == run_files(tmp_path / "b") == run_files(tmp_path / "c")
    assert np.array_equal(np.load(folder / "embedding.npy", allow_pickle=False), stored)


def test_the_key_changes_with_the_weights_the_teacher_and_the_data_options(teacher, tmp_path):
    trainer = Trainer(student_cfg(teacher, tmp_path / "run", "teacher.cache=off"))
    cfg, model, loader = trainer.cfg, trainer.teacher, trainer.data.train_loader
    key = _key(cfg, model, loader, [False, True], torch.float32, torch.device("cpu"))
    assert key == _key(cfg, model, loader, [False, True], torch.float32, torch.device("cpu"))
    with torch.no_grad():
        weight = next(model.parameters())
        weight[(0,) * weight.dim()] += 1e-6  # a changed checkpoint
    changed = _key(cfg, model, loader, [False, True], torch.float32, torch.device("cpu"))
    assert changed["teacher"]["state"] != key["teacher"]["state"]
    other = build_model("mfd-cnn", 10, image_size=8)  # another teacher of the same architecture
    assert _key(cfg, other, loader, [False, True], torch.float32, torch.device("cpu"))["teacher"] != key["teacher"]
    skewed = Trainer(student_cfg(teacher, tmp_path / "run2", "teacher.cache=off", "data.options.skew=0.8"))
    skew_key = _key(skewed.cfg, model, skewed.data.train_loader, [False, True], torch.float32, torch.device("cpu"))
    assert skew_key["data"]["images"] != changed["data"]["images"] and skew_key["data"]["options"] != key["data"]["options"]
    assert _key(cfg, model, loader, [False], torch.float32, torch.device("cpu"))["views"] == ["plain"]
    assert _key(cfg, model, loader, [False, True], torch.float32, torch.device("cpu"), channels_last=True) != changed


# ----------------------------------------------------------------------------- where it is not exact


@pytest.mark.parametrize("extra,words", [
    (["data.padding=1"], "data.padding=1"),
    (["data.crop=random:8"], "data.crop random"),
    (["teacher.dropout=true"], "teacher.dropout"),
    (["amp=bf16"], "amp=bf16"),
])
def test_on_is_refused_before_any_data_where_the_config_rules_out_an_exact_cache(teacher, tmp_path, extra, words):
    with pytest.raises(ConfigError, match="teacher.cache: on") as err:
        Trainer(student_cfg(teacher, tmp_path / "on", "teacher.cache=on", *extra))
    assert words in str(err.value) and not (tmp_path / "on").exists()
    assert any(words in r for r in config_refusals(student_cfg(teacher, tmp_path / "auto", *extra)))


@pytest.mark.parametrize("extra,words", [
    (["teacher.bn_mode=train"], "BatchNorm in train mode"),
    (["method=jacobian"], "gradients through the teacher"),
])
def test_on_is_refused_for_a_stage_the_cache_cannot_serve_and_auto_runs_the_teacher(teacher, tmp_path, extra, words):
    with pytest.raises(ConfigError, match="teacher.cache: on") as err:
        Trainer(student_cfg(teacher, tmp_path / "on", "teacher.cache=on", "epochs=4", *extra))
    assert words in str(err.value)
    assert Trainer(student_cfg(teacher, tmp_path / "auto", "epochs=4", *extra)).teacher_cache is None


def test_auto_caches_where_it_saves_teacher_forwards(teacher, tmp_path, capsys):
    shutil.rmtree(teacher / CACHE_DIR, ignore_errors=True)
    # one epoch with flips serves fewer rows than the two views' build would compute
    assert Trainer(student_cfg(teacher, tmp_path / "a")).teacher_cache is None
    assert "teacher cache: off (building it" in capsys.readouterr().out
    assert Trainer(student_cfg(teacher, tmp_path / "b", "epochs=4")).teacher_cache is not None
    assert Trainer(student_cfg(teacher, tmp_path / "c", "epochs=4", "teacher.cache=off")).teacher_cache is None
    assert Trainer(student_cfg(teacher, tmp_path / "d")).teacher_cache is not None  # now stored: nothing to build
    assert ", read (" in capsys.readouterr().out


# ----------------------------------------------------------------------------- field declarations


def test_declared_features_let_only_the_declared_fields_be_read():
    t = [torch.full((1,), float(i)) for i in range(3)]
    feats = Features(logits=torch.zeros(1), stages=t, embedding=torch.ones(1), extra={"block": t, "map": t[0]})
    view = DeclaredFeatures(feats, ["stages.2", "extra.block.0"], "but X")
    assert len(view.stages) == 3 and view.stages[-1] is t[2] and view.extra["block"][0] is t[0]
    for read in (lambda: view.logits, lambda: view.embedding, lambda: view.stages[1], lambda: list(view.stages),
                 lambda: view.extra["block"][2], lambda: view.extra["map"]):
        with pytest.raises(FeatureNotComputed, match="of the teacher was read, but X"):
            read()
    with pytest.raises(FeatureNotComputed, match=r"Features.stages\[0\]"):
        view.stages[0]
    assert view.extra.get("missing") is None and len(DeclaredFeatures(feats, ["logits"], "").stages) == 3


@TERMS.register("test-cache-reads-more-than-declared")
class ReadsMoreThanDeclared(Term):
    """Declares the logits, reads the embedding too."""

    def teacher_fields(self):
        return ("logits",)

    def forward(self, inp):
        return inp.teacher.logits.sum() * 0 + inp.teacher.embedding.sum()


def test_a_term_reading_an_undeclared_teacher_field_fails_naming_the_term():
    torch.manual_seed(0)
    s, t, x = TinyNet(), TinyNet(), torch.randn(4, 3, 8, 8)
    objective = Objective({"sloppy": {"type": "test-cache-reads-more-than-declared"}})
    with pytest.raises(TrainingError, match=r"terms.sloppy .*Features.embedding of the teacher .*teacher_fields"):
        objective(make_input(s, t, x), s, ["sloppy"], 1.0, {"sloppy": 1.0})


TERM_SPECS = [
    {"type": "kd"}, {"type": "mfd"}, {"type": "at"}, {"type": "at", "position": "prerelu", "positions": "last"},
    {"type": "nst"}, {"type": "nst", "feature": "embedding"}, {"type": "nst", "positions": "all", "position": "prerelu"},
    {"type": "fitnet-hint"}, {"type": "fitnet-hint", "feature": "embedding"}, {"type": "ofd"},
    {"type": "ab", "positions": [0]}, {"type": "jacobian"},
]


@pytest.mark.parametrize("spec", TERM_SPECS, ids=lambda s: "-".join(map(str, s.values())))
def test_every_built_in_term_declares_every_teacher_field_it_reads(spec):
    torch.manual_seed(0)
    s, t = TinyNet(channels=(4, 8), num_classes=3), TinyNet(channels=(4, 8), num_classes=3)
    x, y = torch.randn(6, 3, 8, 8), torch.tensor([0, 1, 2, 0, 1, 2])
    objective = Objective({"term": spec})
    term = objective.term("term")
    term.setup(make_ctx(s, t, x))
    fields = term.teacher_fields()
    assert fields, spec
    s.train()
    x.requires_grad_(term.input_grad)

    def inp():
        return make_input(s, t, x, y, teacher_grad=term.teacher_grad)

    declared = objective.run_term("term", inp())  # the objective's view of the declared fields
    assert torch.equal(declared, term(inp()))


def test_ft_declares_the_paraphrasers_field():
    torch.manual_seed(0)
    s, t, x = TinyNet(), TinyNet(), torch.randn(4, 3, 8, 8)
    objective = Objective({"p": {"type": "ft-paraphraser"}, "ft": {"type": "ft", "paraphraser": "p"}})
    ctx = make_ctx(s, t, x, terms=dict(objective.terms.items()))
    for term in objective.terms.values():
        term.setup(ctx)
    assert objective.term("ft").teacher_fields() == objective.term("p").teacher_fields() == ("extra.block.1",)
    inp = make_input(s, t, x)
    for name in ("p", "ft"):
        assert torch.isfinite(objective.run_term(name, inp))
