"""Every command in README.md's ``bash`` code blocks is exercised, in README order, in one
scratch folder (``configs/`` and ``specs/`` linked in), so the README cannot drift from the tool.

The rule for each command (a command the rules do not cover fails this test: add a rule):

- a synopsis line (upper-case placeholders such as CONFIG, RUN_DIR, or ``[...]``): the
  subcommand exists and accepts every ``--option`` the line shows;
- ``fairdistill train`` of a ``configs/digits_s`` config runs for real, with ``epochs=1
  progress=false`` appended (the embedded data trains in about a second); a run that the README
  later resumes ("after a kill") is instead interrupted after its first of two epochs (as Ctrl-C
  would: exit 130) so that the resume has something to continue; ``--resume`` commands run as
  written; ``train`` of any other config is resolved with ``fairdistill config`` (its data is not
  here);
- ``fairdistill eval`` runs as written (on a run made by an earlier command);
- ``fairdistill sweep`` runs with ``--dry-run`` (the whole spec is checked, nothing trained);
- ``fairdistill report DIR`` of a folder no command made (its sweep was a dry run) must fail
  with one error line naming the folder, exit 2;
- ``torchrun ... -m fairdistill train CONFIG ...``: the config resolves (``fairdistill config``);
- ``make TARGET``: ``make -n TARGET`` succeeds (skipped without make);
- ``.venv/bin/python FILE.py``: the file exists and compiles.
"""
from __future__ import annotations

import py_compile
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from fairdistill.cli import build_parser, main
from fairdistill.engine.trainer import Trainer

ROOT = Path(__file__).resolve().parents[1]
TINY = ["epochs=1", "progress=false"]
PLACEHOLDER = re.compile(r"\[|\b(CONFIG|RUN_DIR|SPEC|DIR|PNG|FILE|N|P)\b")


def readme_commands() -> list[str]:
    """The commands of README.md's bash blocks: comments stripped, ``&&`` chains split."""
    commands, block = [], None
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block = line[3:].strip() if block is None else None
            continue
        if block not in ("bash", "sh", "shell") or not line.strip():
            continue
        code = re.split(r"\s+#\s", " " + line.strip(), maxsplit=1)[0].strip()
        commands += [c.strip() for c in code.split("&&") if c.strip()]
    return commands


def resumed_outs(commands: list[str]) -> set[str]:
    """The run folders that a later command continues (``train --resume RUN_DIR``, or ``train
    CONFIG out=DIR --resume``)."""
    outs = set()
    for c in commands:
        words = shlex.split(c)
        if words[:2] == ["fairdistill", "train"] and "--resume" in words and not PLACEHOLDER.search(c):
            first = next(w for w in words[2:] if w != "--resume")
            outs.add(first if not first.endswith((".yaml", ".yml")) else
                     next((w[4:] for w in words if w.startswith("out=")), None))
    return outs


def option_names(sub: str) -> set[str]:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return {s for a in action.choices[sub]._actions for s in a.option_strings}


class Interrupt:
    """A Trainer callback that raises KeyboardInterrupt after the first epoch (Ctrl-C)."""

    def __call__(self, trainer, record):
        if record["global_epoch"] == 1:
            raise KeyboardInterrupt


def run(argv: list[str], capsys) -> tuple[int, str]:
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return rc, err


def test_readme_commands_all_work(tmp_path, monkeypatch, capsys):
    commands = readme_commands()
    assert len(commands) >= 10
    for name in ("configs", "specs"):
        (tmp_path / name).symlink_to(ROOT / name)
    monkeypatch.chdir(tmp_path)
    interrupted = resumed_outs(commands)
    seen = []
    for command in commands:
        words = shlex.split(command)
        head = words[0]
        if head == "make":
            if shutil.which("make") is None:
                continue
            subprocess.run(["make", "-n", *words[1:]], cwd=ROOT, check=True, capture_output=True)
            seen.append("make")
        elif head.endswith("python") and words[1].endswith(".py"):
            py_compile.compile(str(ROOT / words[1]), doraise=True, cfile=str(tmp_path / "compiled.pyc"))
            seen.append("python")
        elif head == "torchrun":
            args = words[words.index("train") + 1:]
            assert run(["config", *args], capsys)[0] == 0, command
            seen.append("torchrun")
        elif head == "fairdistill" and PLACEHOLDER.search(command):
            sub = words[1]
            shown = {w.split("=")[0] for w in words[2:] if w.strip("[]").startswith("--")}
            missing = {w.strip("[]") for w in shown} - option_names(sub)
            assert not missing, f"{command}: {sorted(missing)} not options of `fairdistill {sub}`"
            seen.append("synopsis")
        elif words[:2] == ["fairdistill", "train"] and "--resume" in words:
            rc, err = run(words[1:], capsys)
            assert rc == 0, f"{command}: {err}"
            seen.append("resume")
        elif words[:2] == ["fairdistill", "train"]:
            args = words[2:]
            out = next((w.split("=", 1)[1] for w in args if w.startswith("out=")), None)
            if not words[2].startswith("configs/digits_s/"):
                assert run(["config", *args], capsys)[0] == 0, command
            elif out in interrupted:
                original = Trainer.__init__

                def init(self, *a, **k):
                    original(self, *a, **k)
                    self.callbacks.append(Interrupt())

                monkeypatch.setattr(Trainer, "__init__", init)
                rc, err = run(words[1:] + ["epochs=2", "progress=false"], capsys)
                monkeypatch.setattr(Trainer, "__init__", original)
                assert rc == 130 and f"fairdistill train --resume {out}" in err, (command, err)
            else:
                rc, err = run(words[1:] + TINY, capsys)
                assert rc == 0, f"{command}: {err}"
            seen.append("train")
        elif words[:2] == ["fairdistill", "eval"]:
            rc, err = run(words[1:], capsys)
            assert rc == 0 and err == "", f"{command}: {err}"
            seen.append("eval")
        elif words[:2] == ["fairdistill", "sweep"]:
            rc, err = run(words[1:] + ["--dry-run"], capsys)
            assert rc == 0, f"{command}: {err}"
            seen.append("sweep")
        elif words[:2] == ["fairdistill", "report"] and not Path(words[2]).exists():
            rc, err = run(words[1:], capsys)
            assert rc == 2 and err.count("\n") == 1 and words[2] in err, f"{command}: {err}"
            seen.append("report")
        else:
            pytest.fail(f"README command without a rule in tests/test_readme.py: {command}")
    assert {"train", "resume", "eval", "sweep", "synopsis"} <= set(seen)
