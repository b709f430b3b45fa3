"""The shape of the library: no import cycle, small modules, one validation pass before any data,
a term contract that fails loudly, one checkpoint module, and `fairdistill config`."""
import ast
from pathlib import Path

import pytest
import torch
import yaml

from fairdistill.cli import main
from fairdistill.config import load_config, to_dict
from fairdistill.engine import train
from fairdistill.engine.checkpoint import FORMAT, KEYS, load_checkpoint, save_checkpoint
from fairdistill.errors import ConfigError, RunDirError, TrainingError
from fairdistill.methods.base import TERMS, Term

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src" / "fairdistill"
CONFIGS = sorted((ROOT / "configs").rglob("*.yaml"))


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """Module -> the fairdistill modules it imports anywhere in its body (function-level
    imports included), each with the packages whose __init__ the import runs, except the
    importing module's own ancestors (a package may import its submodules)."""
    modules = {module_name(p): p for p in SRC.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        is_pkg = path.name == "__init__.py"
        package = name if is_pkg else name.rsplit(".", 1)[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = package.split(".")
                if node.level:
                    base = base[: len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                candidates = [target] + [f"{target}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                candidates = [a.name for a in node.names]
            else:
                continue
            for c in candidates:
                if c in modules:
                    parts = c.split(".")
                    targets |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
        ancestors = {".".join(name.split(".")[:i]) for i in range(1, len(name.split(".")) + 1)}
        graph[name] = {t for t in targets if t in modules and t not in ancestors}
    return graph


def test_no_import_cycle():
    graph = import_graph()
    assert "fairdistill.config.presets" in graph and "fairdistill.methods.base" in graph
    state: dict[str, int] = {}

    def visit(node, stack):
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    # the config layer does not reach into the engine, and methods do not read the config
    assert not any(t.startswith("fairdistill.engine") for t in graph["fairdistill.config.validate"])
    assert not any(t.startswith("fairdistill.config") for m, ts in graph.items() if m.startswith("fairdistill.methods")
                   for t in ts)


def test_no_module_over_450_lines():
    long = {p.relative_to(SRC): n for p in SRC.rglob("*.py") if (n := len(p.read_text().splitlines())) > 450}
    assert not long


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(ROOT / "configs")) for p in CONFIGS])
def test_fairdistill_config_prints_every_shipped_config(path, capsys):
    assert main(["config", str(path)]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed == yaml.safe_load(yaml.safe_dump(to_dict(load_config(path))))


def test_fairdistill_config_refuses_a_bad_key_with_exit_2(capsys):
    assert main(["config", str(ROOT / "configs/digits_s/hkd.yaml"), "optim.lrr=0.1"]) == 2
    err = capsys.readouterr().err
    assert "optim.lrr: unknown key" in err and "Did you mean 'lr'" in err


def test_a_term_option_typo_is_reported_before_a_missing_data_folder(tmp_path, capsys):
    argv = ["train", str(ROOT / "configs/digits_s/hkd.yaml"), "terms.kd.TT=3", "data.name=cifar10s",
            f"data.root={tmp_path / 'no-such-folder'}", f"out={tmp_path / 'run'}", "teacher.run=whatever"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "terms.kd.TT: unknown option" in err and "Did you mean 'T'" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, words", [
    ("terms.kd.T=hot", ["terms.kd.T", "expected float"]),
    ("terms.kd.T=0", ["terms.kd.T", "must be > 0"]),
    ("optim.lr=.nan", ["optim.lr", "finite"]),
    ("data.sampler=balancd", ["data.sampler", "Did you mean 'balanced'"]),
    ("stages=[{epochs: -1}]", ["stages[0].epochs", ">= 0"]),
    ("data.options.seed=3", ["data.options.seed", "the top-level key seed"]),
    ("model.options.num_classes=5", ["model.options.num_classes", "the data set fixes"]),
])
def test_values_are_checked_by_annotation_naming_the_key(override, words):
    with pytest.raises(ConfigError) as err:
        load_config(ROOT / "configs/digits_s/hkd.yaml", [override])
    for w in words:
        assert w in str(err.value)


@TERMS.register("test-reads-embedding-without-asking")
class ReadsEmbeddingWithoutAsking(Term):
    """A term that forgets ``needs_features``: it must fail, not train on the logits."""

    needs_teacher = False
    needs_features = False

    def forward(self, inp):
        return inp.student.embedding.pow(2).mean()


def test_reading_a_feature_that_was_not_computed_names_the_term_and_the_flag(tmp_path):
    cfg = load_config(ROOT / "configs/digits_s/scratch.yaml", [
        "epochs=1", "progress=false", f"out={tmp_path / 'run'}",
        "terms={sloppy: {type: test-reads-embedding-without-asking}}"])
    with pytest.raises(TrainingError) as err:
        train(cfg)
    assert "terms.sloppy" in str(err.value) and "needs_features" in str(err.value)


def test_term_options_are_checked_when_built_in_python_too():
    with pytest.raises(ConfigError, match=r"kd\.T: must be > 0"):
        TERMS.get("kd")(T=-1)
    with pytest.raises(ConfigError, match=r"mfd\.kernel: 'gauss' is not valid"):
        TERMS.get("mfd")(kernel="gauss")
    assert TERMS.get("kd")(T=2).T == 2.0 and isinstance(TERMS.get("kd")(T=2).T, float)


def test_checkpoint_round_trip_through_the_one_module(tmp_path):
    state = {k: {} for k in KEYS} | {"stage": 1, "epoch": 2, "model": {"w": torch.arange(3.0)}, "history": [{"a": 1}],
                                     "elapsed": 1.5}
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, state)
    back = load_checkpoint(path)
    assert back["format"] == FORMAT and back["stage"] == 1 and back["epoch"] == 2 and back["history"] == [{"a": 1}]
    assert torch.equal(back["model"]["w"], torch.arange(3.0))
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(path, {"stage": 0})
    torch.save({"format": FORMAT + 1, **state}, path)
    with pytest.raises(RunDirError, match="not a fairdistill checkpoint"):
        load_checkpoint(path)
    path.write_bytes(b"truncated")
    with pytest.raises(RunDirError, match="cannot be read"):
        load_checkpoint(path)
