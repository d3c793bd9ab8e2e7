"""What the command line prints: the consoles, one-line messages and the tables of each command's results.

Library messages are printed verbatim (paths may contain [brackets]) but never raw: every line and table
cell goes through :func:`safe`, which escapes control characters (:func:`posthoc.errors.printable`: a
file name with a newline or a terminal escape stays one visible line) and rich markup. Warnings and errors
go to stderr. Under torchrun only rank 0 prints (:func:`posthoc.cli.main` quiets the others).
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import printable

console = Console(emoji=False)  # ':smile:' in a file name stays as written
err_console = Console(stderr=True, emoji=False)
METRICS = (("top-1 (%)", "top1", "{:.2f}"), ("NLL", "nll", "{:.4f}"), ("ECE (%)", "ece", "{:.2f}"), ("Brier", "brier", "{:.4f}"))


def safe(text: Any) -> str:
    """``text`` ready for a rich console: control characters escaped, then rich markup."""
    return escape(printable(text))


def log(message: str) -> None:
    """A progress message from the library."""
    console.print(safe(message), highlight=False)


def warn(message: str) -> None:
    """A warning, on stderr."""
    err_console.print(f"[yellow]warning:[/] {safe(message)}", highlight=False, soft_wrap=True)


def error(message: str) -> None:
    """The one line of a user error, on stderr."""
    err_console.print(f"[bold red]error:[/] {safe(message)}", highlight=False, soft_wrap=True)


class Markup(str):
    """A table cell that is rich markup of posthoc's own (``[red]failed[/]``), printed as markup."""


def table(title: str, columns: list[str], rows: list[list[str]]) -> None:
    """A table whose first column is left-aligned and the others right-aligned; the title and every cell
    are printed as text (:func:`safe`), except :class:`Markup` cells."""
    out = Table(title=safe(title))
    for i, column in enumerate(columns):
        out.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        out.add_row(*(cell if isinstance(cell, Markup) else safe(cell) for cell in row))
    console.print(out)


def wrote(path: str, seconds: float | None = None) -> None:
    """Where an artifact went, and how to report on it."""
    took = f" in {seconds:.0f} s" if seconds is not None else ""
    console.print(
        f"wrote {safe(path)}{took}; report on held-out data with `posthoc eval {safe(path)} --data DATA --split val:report`",
        highlight=False,
    )


def eval_row(row: dict[str, Any], single: bool) -> None:
    """One model's result as it finishes: the whole table for a single model, a line (or its error) for several."""
    if single:
        return eval_result(row)
    if "error" in row:
        err_console.print(f"[red]{safe(row['model'])}: {safe(row['error'])}[/]", highlight=False, soft_wrap=True)
    else:
        console.print(
            f"{safe(row['model'])}: top-1 {row['top1']:.2f}%, NLL {row['nll']:.4f} ({row['images']} images)", highlight=False
        )


def eval_result(result: dict[str, Any]) -> None:
    """Every figure of one model's evaluation."""
    fields = [
        *METRICS[:1],
        ("top-5 (%)", "top5", "{:.2f}"),
        *METRICS[1:],
        ("members", "members", "{}"),
        ("mean member top-1 (%)", "member_top1", "{:.2f}"),
        ("disagreement (%)", "disagreement", "{:.2f}"),
        ("params (M)", "param_count", "{:.2f}"),
        ("throughput (img/s)", "throughput", "{:.0f}"),
    ]
    rows = [[label, fmt.format(result[key])] for label, key, fmt in fields if result.get(key) is not None]
    table(f"{result['model']} on {result.get('split', '')} ({result['images']} images)", ["metric", "value"], rows)
    if result.get("skipped_images"):
        warn(f"skipped {result['skipped_images']} unreadable image(s); the metrics cover the other {result['images']}")


def eval_rows(rows: list[dict[str, Any]]) -> None:
    """Several models' headline figures, one row each (failed ones marked)."""
    columns = (
        ("top1", "{:.2f}"),
        ("top5", "{:.2f}"),
        ("nll", "{:.4f}"),
        ("ece", "{:.2f}"),
        ("param_count", "{:.2f}"),
        ("throughput", "{:.0f}"),
    )
    cells = [
        [r["model"], *([Markup("[red]failed[/]")] + [""] * 5 if "error" in r else [f.format(r[k]) for k, f in columns])]
        for r in rows
    ]
    headings = ["model", "top-1 (%)", "top-5 (%)", "NLL", "ECE (%)", "params (M)", "img/s"]
    table(f"{len(rows)} models on {rows[0].get('split', '')}", headings, cells)


def boost_summary(s: dict[str, Any]) -> None:
    """Parent against artifact on the select part, with the artifact's inference cost."""
    ens, par, cost = s["ensemble"], s["parent"], s["cost"]
    rows = [
        [label, fmt.format(par[k]), fmt.format(ens[k]), ("{:+" + fmt[2:]).format(ens[k] - par[k])] for label, k, fmt in METRICS
    ]
    rows += [
        ["members", "1", str(cost["members"]), ""],
        ["test-time views", "1", str(cost.get("views", 1)), ""],
        ["parameters (M)", "", f"{cost['parameters'] / 1e6:.2f}", ""],
        ["forward FLOPs (x parent)", "1.00", f"{cost['flops_ratio']:.2f}", ""],
        ["forward time (x parent, this machine)", "1.00", f"{cost['time_ratio']:.2f}", ""],
    ]
    table(f"validation (select part): parent vs {s['members']}-member ensemble", ["metric", "parent", "ensemble", "change"], rows)
    if s["student"]:
        student(s["student"])
    wrote(s["student"]["out"] if s["student"] else s["out"], s["seconds"])


def student(r: dict[str, Any]) -> None:
    """A distilled student against its starting point and its teacher."""
    rows = [[label, *(fmt.format(r[w][k]) for w in ("before", "teacher", "student"))] for label, k, fmt in METRICS[:3]]
    rows.append(["forward FLOPs (x parent)", "1.00", f"{r['teacher_flops_ratio']:.2f}", "1.00"])
    table("distilled student on the select part (1 network)", ["metric", "parent", "teacher", "student"], rows)
    console.print(f"distillation cost: about {r['cost_parent_epochs']:.2f} parent-epochs (from FLOPs)", highlight=False)


def demo_summary(r: dict[str, Any], method: str) -> None:
    """The demo's parent against its artifact on held-out digits."""
    rows = [[label, fmt.format(r["parent"][k]), fmt.format(r[method][k])] for label, k, fmt in METRICS]
    rows.append(["members", "1", str(r[method].get("members", 1))])
    table(f"held-out digits ({r['images']} images, never used for training or tuning)", ["metric", "parent", method], rows)
    console.print(
        f"artifact: {safe(r['artifact'])} (built in {r['build_seconds']:.0f} s; whole demo {r['seconds']:.0f} s). "
        f"Next: posthoc info {safe(r['artifact'])}",
        highlight=False,
    )


def rows_without_header(rows: list[tuple[str, str]]) -> None:
    """``(label, text)`` rows with bold labels (``posthoc info``, ``posthoc methods NAME``)."""
    out = Table(show_header=False, box=None)
    out.add_column(style="bold")
    out.add_column()
    for label, text in rows:
        out.add_row(safe(label), safe(text))
    console.print(out)


def exported(r: dict[str, Any]) -> None:
    """What ``posthoc export`` wrote and how it was checked."""
    diff = r["max_abs_diff"]
    checked = "not validated" if diff is None else f"max abs difference to posthoc.load {diff:.1e} on batches {r['batches']}"
    console.print(
        f"wrote {safe(r['out'])} ({r['bytes'] / 1e6:.1f} MB; outputs {', '.join(r['outputs'])}; {checked}) and {safe(r['metadata'])}",
        highlight=False,
    )
