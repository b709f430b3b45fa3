"""The configs and sweep specs that ship with fairdistill, and finding a CONFIG or SPEC there.

The repository keeps ``configs/`` and ``specs/`` at its root; a wheel installs them as
``fairdistill/configs`` and ``fairdistill/specs`` (``setup.py`` maps the folders as the packages
``fairdistill.configs`` / ``fairdistill.specs`` with their YAML files as package data), with
the same layout, so a config's ``base: ../base.yaml`` resolves in both places. A command-line
CONFIG, SPEC or demo folder that is not an existing path is looked up there, with or without a
leading ``configs/`` / ``specs/`` and the ``.yaml`` suffix: ``fairdistill train cifar10s/mfd``,
``fairdistill train configs/digits_s/teacher.yaml`` and ``fairdistill sweep digits_s_mfd`` work
from any folder. An existing path always wins.
"""
from __future__ import annotations

from pathlib import Path

KINDS = ("configs", "specs")


def packaged_dir(kind: str) -> Path | None:
    """The folder of packaged ``kind`` files (``configs`` or ``specs``): inside the installed
    package, else at the root of the source checkout this module runs from; None if neither."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    here = Path(__file__).resolve().parent
    for folder in (here / kind, here.parent.parent / kind):
        if folder.is_dir():
            return folder
    return None


def _candidates(arg: Path, kind: str) -> list[Path]:
    base = packaged_dir(kind)
    if base is None or arg.is_absolute():
        return []
    rel = Path(*arg.parts[1:]) if arg.parts[:1] == (kind,) and len(arg.parts) > 1 else arg
    out = [base / rel]
    if rel.suffix not in (".yaml", ".yml"):
        out.append(base / rel.with_name(rel.name + ".yaml"))
    return out


def find_file(arg: str | Path, kind: str = "configs") -> Path:
    """``arg`` if it is an existing file, else the packaged ``kind`` file it names, else ``arg``
    unchanged (the caller's error then names what the user typed)."""
    path = Path(arg)
    if path.is_file():
        return path
    return next((c for c in _candidates(path, kind) if c.is_file()), path)


def find_dir(arg: str | Path, kind: str = "configs") -> Path:
    """``arg`` if it is an existing folder, else the packaged folder it names, else ``arg``."""
    path = Path(arg)
    if path.is_dir():
        return path
    return next((c for c in _candidates(path, kind) if c.is_dir()), path)
