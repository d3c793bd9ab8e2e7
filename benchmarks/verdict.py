"""The verdict of a results table: which row dominates which (benchmarks/PROTOCOL.md).

A row is *dominated* when another row of the same comparison has no more training (parent-epochs), no
more inference FLOPs, a top-1 at least as high and an NLL at least as low, and is strictly better in at
least one of the four. A row with a figure missing (no NLL, no FLOPs count) is compared with no row: it
neither dominates nor is dominated. The rows that nothing dominates are the *front*.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

FIGURES = ("parent_epochs", "flops_ratio", "top1", "nll")  # lower, lower, higher, lower is better
LOWER_IS_BETTER = {"parent_epochs": True, "flops_ratio": True, "top1": False, "nll": True}
EPS = 1e-9


def _figures(row: Mapping[str, Any]) -> tuple[float, ...] | None:
    """The four figures of a row; top-1 and NLL read from the row or from its ``metrics`` (a benchmark record)."""
    metrics = row.get("metrics") or {}
    values = tuple(row.get(k, metrics.get(k)) for k in FIGURES)
    return None if any(v is None for v in values) else tuple(float(v) for v in values)


def dominates(b: Mapping[str, Any], a: Mapping[str, Any]) -> bool:
    """Whether row ``b`` dominates row ``a`` (rows hold ``parent_epochs``, ``flops_ratio``, ``top1``, ``nll``, the last
    two possibly under ``metrics`` as ``cifar10.py``'s records keep them)."""
    fb, fa = _figures(b), _figures(a)
    if fb is None or fa is None:
        return False
    no_worse, better = True, False
    for key, vb, va in zip(FIGURES, fb, fa):
        gain = (va - vb) if LOWER_IS_BETTER[key] else (vb - va)
        no_worse &= gain >= -EPS
        better |= gain > EPS
    return no_worse and better


def _cheapest_first(row: Mapping[str, Any]) -> tuple[float, ...]:
    parent_epochs, flops, top1, nll = _figures(row)
    return parent_epochs, flops, -top1, nll


def verdicts(rows: Iterable[Mapping[str, Any]]) -> dict[str, str | None]:
    """For every row (by ``key``) the key of the row that dominates it, or ``None`` (the front). Where several
    dominate, the cheapest is named (fewest parent-epochs, then fewest FLOPs, then highest top-1)."""
    rows = list(rows)
    out: dict[str, str | None] = {}
    for a in rows:
        beaters = [b for b in rows if b is not a and dominates(b, a)]
        beaters.sort(key=_cheapest_first)
        out[a["key"]] = beaters[0]["key"] if beaters else None
    return out
