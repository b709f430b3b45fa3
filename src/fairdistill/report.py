"""The papers' result tables from runs: table functions on plain rows, and a sweep folder's report.

- ``mfd``: accuracy, DEO_A and DEO_M of the final epoch, x100, mean ± standard deviation over
  the seeds (MFD supplement Tables 2-4; the paper does not say which standard deviation, the
  report uses the sample one, ddof = 1);
- ``ofd``: error rate = 100 - accuracy of the final epoch, median over the runs (OFD, official
  code's README and its issue #9), optionally pivoted with one column per setting (OFD Table 2,
  supplement Tables 1-2);
- ``seg`` (dense runs): mIoU, the mIoU gap between groups, DEO_A/DEO_M on per-(group, class)
  pixel recall and the IoU gaps (mean/max over classes of max_g - min_g of IoU[g, c]);
- ``det``: mAP, the mAP gap between groups, the AP gaps and DEO_A/DEO_M on per-(group, class)
  recall; both x100, mean ± sample standard deviation over the seeds (``metrics/segmentation.py``,
  ``metrics/detection.py``).

:func:`mfd_table`, :func:`ofd_table`, :func:`seg_table` and :func:`det_table` take
:class:`TableRow`s (the demo builds them from its runs); :func:`write_report` reads a sweep
folder (``fairdistill report DIR``).
"""
from __future__ import annotations

import csv
import io
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .errors import FairdistillError, RunDirError
from .progress import format_seconds
from .rundir import read_json, write_text
from .sweeps.state import collect
from .sweeps.spec import LAYOUTS, SweepSpec, STATUS


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (ddof = 1; None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def error_rate(result: dict) -> float:
    """100 - accuracy (%) of the final epoch."""
    return 100.0 * (1.0 - result["final"]["accuracy"])


def summarize_mfd(results: list[dict]) -> dict[str, tuple[float, float | None]]:
    """metric -> (mean, sample std) over runs, x100, of the final accuracy, DEO_A and DEO_M."""
    return {m: mean_std([100.0 * r["final"][m] for r in results]) for m in LAYOUTS["mfd"]} if results else {}


def summarize_ofd(results: list[dict]) -> dict[str, float]:
    """Median, min and max over runs of the final error rate (%)."""
    errors = [error_rate(r) for r in results]
    return {"median": statistics.median(errors), "min": min(errors), "max": max(errors)} if errors else {}


def fmt(mean: float | None, std: float | None = None) -> str:
    if mean is None:
        return "n/a"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"


def fmt_paper(value) -> str:
    if value is None:
        return ""
    return fmt(*value) if isinstance(value, list) else fmt(value)


def markdown_table(header: list[str], rows: list[list[str]], align: str) -> str:
    """``align``: one of l / r per column."""
    sep = ["---" if a == "l" else "---:" for a in align]
    return "\n".join("| " + " | ".join(r) + " |" for r in [header, sep, *rows])


@dataclass
class TableRow:
    """A report row: a label, the ``result.json`` contents of its finished runs, how many runs
    were planned (default: as many as finished), the paper's values (``accuracy``/``deo_a``/
    ``deo_m`` as [mean, std], or ``error``), a pivot ``column`` (ofd layout) and what happened to
    the runs without a result (``missing``: "seed 2 failed", ...)."""

    label: str
    results: list
    planned: int | None = None
    paper: dict = field(default_factory=dict)
    column: str | None = None
    missing: list = field(default_factory=list)

    @property
    def runs(self) -> str:
        n = len(self.results)
        return f"{n}/{n + len(self.missing)}"

    @property
    def planned_runs(self) -> int:
        return len(self.results) if self.planned is None else self.planned


def mean_std_table(entries: list[TableRow], columns: dict[str, str], summarize, with_paper: bool) -> tuple[str, list[dict]]:
    """Markdown and CSV records of a layout of mean ± std columns: ``columns`` maps each metric to
    its header, ``summarize(results)`` gives each metric's (mean, std) x100 (None where absent);
    with ``with_paper`` each column has the paper's value beside it."""
    header, align, rows, records = ["Method"], "l", [], []
    for title in columns.values():
        header += [title, "(paper)"] if with_paper else [title]
        align += "rr" if with_paper else "r"
    header.append("Runs")
    align += "r"
    for e in entries:
        s = summarize(e.results)
        cells, rec = [e.label], {"method": e.label, "runs": len(e.results), "planned": e.planned_runs}
        for m in columns:
            mean, std = s.get(m, (None, None))
            cells.append(fmt(mean, std))
            rec[f"{m}_mean"], rec[f"{m}_std"] = mean, std
            paper = e.paper.get(m)
            if with_paper:
                cells.append(fmt_paper(paper))
            parts = paper if isinstance(paper, list) else [paper]
            rec[f"paper_{m}_mean"], rec[f"paper_{m}_std"] = parts[0], (parts[1] if len(parts) > 1 else None)
        cells.append(e.runs)
        rows.append(cells)
        records.append(rec)
    return markdown_table(header, rows, align), records


def mfd_table(entries: list[TableRow], with_paper: bool) -> tuple[str, list[dict]]:
    """Markdown and CSV records of the mfd layout (paper values beside the measured ones)."""
    return mean_std_table(entries, dict(zip(LAYOUTS["mfd"], ("Accuracy", "DEO_A", "DEO_M"))), summarize_mfd, with_paper)


def ofd_table(entries: list[TableRow], with_paper: bool) -> tuple[str, list[dict]]:
    """Markdown and CSV records of the ofd layout; rows with a ``column`` are pivoted."""
    records = []
    for e in entries:
        s = summarize_ofd(e.results)
        records.append({"method": e.label, "column": e.column or "", "runs": len(e.results),
                        "planned": e.planned_runs, "error_median": s.get("median"), "error_min": s.get("min"),
                        "error_max": s.get("max"), "paper_error": e.paper.get("error")})
    if any(e.column is not None for e in entries):
        labels = list(dict.fromkeys(e.label for e in entries))
        columns = list(dict.fromkeys(e.column or "" for e in entries))
        cell = {}
        for e, rec in zip(entries, records):
            text = fmt(rec["error_median"])
            if len(e.results) < e.planned_runs:
                text += f" ({e.runs})"
            if with_paper:
                text += f" / {fmt_paper(rec['paper_error']) or '-'}"
            cell[(e.label, e.column or "")] = text
        rows = [[lab, *(cell.get((lab, c), "") for c in columns)] for lab in labels]
        return markdown_table(["Method", *columns], rows, "l" + "r" * len(columns)), records
    header = ["Method", "Error (median)", *(["(paper)"] if with_paper else []), "min-max", "Runs"]
    rows = []
    for e, rec in zip(entries, records):
        span = "" if not e.results else f"{rec['error_min']:.2f}-{rec['error_max']:.2f}"
        rows.append([e.label, fmt(rec["error_median"]), *([fmt_paper(rec["paper_error"])] if with_paper else []),
                     span, e.runs])
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1)), records


DENSE_COLUMNS = {"miou": "mIoU", "miou_gap": "mIoU gap", "map": "mAP", "map_gap": "mAP gap", "deo_a": "DEO_A",
                 "deo_m": "DEO_M", "iou_gap_a": "IoU gap_A", "iou_gap_m": "IoU gap_M", "ap_gap_a": "AP gap_A",
                 "ap_gap_m": "AP gap_M"}
"""Column titles of the dense layouts' metrics."""


def summarize_dense(results: list[dict], layout: str) -> dict[str, tuple[float | None, float | None]]:
    """metric -> (mean, sample std) x100 over the runs of ``layout``'s final metrics; a run whose
    value is NaN (a gap with fewer than two groups) is left out of that metric, and a metric no
    run defines is (None, None)."""
    out = {}
    for m in LAYOUTS[layout]:
        values = [100.0 * r["final"][m] for r in results if r["final"].get(m) is not None and r["final"][m] == r["final"][m]]
        out[m] = mean_std(values) if values else (None, None)
    return out


def dense_table(entries: list[TableRow], layout: str, with_paper: bool) -> tuple[str, list[dict]]:
    """Markdown and CSV records of the ``seg`` or ``det`` layout: one column per metric of
    ``LAYOUTS[layout]`` (x100, mean ± std over seeds), each beside the paper's with ``with_paper``."""
    return mean_std_table(entries, {m: DENSE_COLUMNS[m] for m in LAYOUTS[layout]},
                          lambda results: summarize_dense(results, layout), with_paper)


def seg_table(entries: list[TableRow], with_paper: bool) -> tuple[str, list[dict]]:
    """The ``seg`` layout: mIoU, mIoU gap, DEO_A, DEO_M (pixel recall), IoU gap_A, IoU gap_M."""
    return dense_table(entries, "seg", with_paper)


def det_table(entries: list[TableRow], with_paper: bool) -> tuple[str, list[dict]]:
    """The ``det`` layout: mAP, mAP gap, AP gap_A, AP gap_M, DEO_A, DEO_M (recall)."""
    return dense_table(entries, "det", with_paper)


TABLES = {"mfd": mfd_table, "ofd": ofd_table, "seg": seg_table, "det": det_table}
"""Layout -> its table function."""


def describe_measure(spec: SweepSpec) -> str:
    if spec.layout in ("seg", "det"):
        what = ("mIoU, the mIoU gap between groups, DEO_A / DEO_M on per-(group, class) pixel recall and the IoU "
                "gaps (mean / max over classes)" if spec.layout == "seg" else
                "mAP (VOC07), the mAP gap between groups, the AP gaps (mean / max over classes) and DEO_A / DEO_M on "
                "per-(group, class) recall")
        what += " (%) of the final epoch on the test set: mean ± sample standard deviation (ddof = 1) over the seeds"
    elif spec.layout == "mfd":
        what = ("Accuracy, DEO_A and DEO_M (%) of the final epoch on the test set: mean ± sample standard deviation "
                "(ddof = 1) over the seeds")
    else:
        what = "Error rate (%) = 100 - accuracy of the final epoch on the test set: median over the runs"
    paper = f"; paper values (`(paper)`{' or after `/`' if spec.layout == 'ofd' else ''}): {spec.paper_source}" if spec.paper_source else ""
    return f"{what}; seeds {', '.join(map(str, spec.seeds))}{paper}."


def _epochs_of(result: dict) -> str:
    """``15``, or ``23 (hint 8 + main 15)`` for a run of several stages (``result["stages"]``)."""
    stages = result.get("stages") or []
    text = str(result.get("epochs", "?"))
    if len(stages) > 1:
        text += " (" + " + ".join(f"{s['name']} {s['epochs']}" for s in stages) + ")"
    return text


def describe_epochs(entries: list[TableRow]) -> str:
    """One sentence saying how many epochs the finished runs trained, per row where they differ."""
    per_row = {e.label: sorted({_epochs_of(r) for r in e.results}) for e in entries if e.results}
    values = {v for vs in per_row.values() for v in vs}
    if len(values) == 1:
        return f"Every finished run trained {values.pop()} epochs."
    common = max(values, key=lambda v: sum(vs == [v] for vs in per_row.values()))
    others = [f"{label} {' or '.join(vs)}" for label, vs in per_row.items() if vs != [common]]
    return f"Epochs per run: {common}, except {', '.join(others)}."


def describe_time(results: list[dict]) -> str:
    """The finished runs' summed time: training (``wall_time_s``) and start-up (``startup_s``:
    imports, data, models and teacher before the first step), where the runs recorded it."""
    train = sum(r.get("wall_time_s", 0.0) for r in results)
    startup = [r["startup_s"] for r in results if r.get("startup_s") is not None]
    text = f"Time summed over the {len(results)} finished runs: {format_seconds(train + sum(startup))}"
    if len(startup) == len(results):
        return text + f" (training {format_seconds(train)}, start-up {format_seconds(sum(startup))})."
    return text + (f" (training {format_seconds(train)}; start-up recorded by {len(startup)} of them: "
                   f"{format_seconds(sum(startup))})." if startup else " (training only: these runs did not record "
                                                                            "their start-up).")


def sweep_status_line(path: Path) -> str:
    """The report's line on the last ``fairdistill sweep`` of the folder, from ``sweep_status.json``;
    a damaged file is reported as such (and on stderr), and the report goes on without it."""
    try:
        st = read_json(path)
        return (f"Last `fairdistill sweep` of this folder: {st['runs']} runs ({st['reused']} reused), "
                f"wall time {format_seconds(st['wall_s'])}, {st['jobs']} at a time on {st['cpus']} CPU(s).")
    except (RunDirError, KeyError, TypeError, ValueError) as e:
        why = str(e) if isinstance(e, RunDirError) else f"{path} is damaged (no valid {e} entry)"
        print(f"fairdistill: warning: {why}; the report leaves out the last sweep's counts", file=sys.stderr)
        return f"Last `fairdistill sweep` of this folder: unknown ({path.name} is damaged)."


def write_csv(path: Path, records: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(records[0]) if records else ["method"], lineterminator="\n")
    writer.writeheader()
    for rec in records:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else ("" if v is None else v)) for k, v in rec.items()})
    write_text(path, buf.getvalue())


def write_report(folder: str | Path, plot: bool = True) -> tuple[str, list[Path]]:
    """Write ``report.md``, ``report.csv`` and (``plot`` and matplotlib present, data with groups)
    ``accuracy_vs_deo.png`` into sweep folder ``folder``; returns the Markdown and the files."""
    folder = Path(folder)
    spec, collected = collect(folder)
    entries = [TableRow(c.row.label, c.results, len(c.row.seeds), c.row.paper, c.row.column, c.missing)
               for c in collected]
    with_paper = any(e.paper for e in entries)
    table, records = TABLES[spec.layout](entries, with_paper)
    parts = [f"# {spec.title or spec.name}", "", describe_measure(spec), ""]
    busy = sum(c.busy for c in collected)
    if busy:
        parts += [f"**Partial:** {busy} run(s) still queued or running; the table holds the finished runs only "
                  f"(`Runs` counts them). Run `fairdistill report {folder}` again when they have ended.", ""]
    parts.append(table)
    missing = [f"- {c.row.name}: {', '.join(c.missing)}" for c in collected if c.missing]
    if missing:
        parts += ["", "Runs without a result (n/a where none finished):", *missing]
    status = folder / STATUS
    if status.is_file():
        parts += ["", sweep_status_line(status)]
    done = [r for e in entries for r in e.results]
    if done:
        parts += [describe_epochs(entries), describe_time(done)]
    files = [folder / "report.md", folder / "report.csv"]
    note = ""
    if plot and spec.layout in ("mfd", "ofd") and any(len(r.get("group_names") or []) > 1 for r in done):
        try:
            from .plots import accuracy_vs_deo

            png = accuracy_vs_deo([(e.label, e.results) for e in entries if e.results], folder / "accuracy_vs_deo.png",
                                  title=spec.title or spec.name)
            files.append(png)
            parts += ["", f"![accuracy vs DEO]({png.name})"]
        except FairdistillError as e:
            note = f"accuracy-vs-DEO plot skipped: {e}"
    text = "\n".join(parts) + "\n"
    write_text(files[0], text)
    write_csv(files[1], records)
    if note:
        print(note, file=sys.stderr)
    return text, files
