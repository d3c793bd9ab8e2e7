"""Inference cost: forward FLOPs and wall time of an artifact relative to its parent.

FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` on one image, so they are exact for
the operations it knows (convolutions, matrix products), deterministic and independent of the
hardware; an artifact is counted as it runs, its shared prefix once. Ratios are compared with a budget
at two decimals, so members that differ only in a classifier fit a budget of 1.0. Time ratios are
measured side by side on the machine at hand (alternating, median of rounds) and only reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .graph import FeaturesAndLogits, split_shared_prefix
from .runtime import synchronize
from .timm_io import last_layers


def input_shape(model: nn.Module) -> tuple[int, ...]:
    """The (C, H, W) a model is fed at evaluation (its ``pretrained_cfg``)."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return tuple(cfg.get("test_input_size") or cfg.get("input_size") or (3, 224, 224))


@torch.no_grad()
def forward_flops(model: nn.Module, shape: tuple[int, ...] | None = None) -> int:
    """FLOPs of one forward pass of ``model`` on one image (an artifact runs its members one after another)."""
    if hasattr(model, "strategy"):  # an EnsembleModule: count the fused computation, members in a loop
        saved, model.strategy = model.strategy, "loop"
    device = next(iter(model.parameters()), torch.empty(0)).device
    x = torch.zeros(1, *(shape or input_shape(model)), device=device)
    try:
        with FlopCounterMode(display=False) as counter:
            model.eval()(x)
    finally:
        if hasattr(model, "strategy"):
            model.strategy = saved
    return int(counter.get_total_flops())


def flops_ratio(module: nn.Module, parent: nn.Module) -> float:
    """Forward FLOPs of ``module`` (an artifact) over its parent's, on the parent's input size."""
    shape = input_shape(parent)
    return forward_flops(module, shape) / max(forward_flops(parent, shape), 1)


@torch.no_grad()
def split_flops(parent: nn.Module, layers: int | None) -> tuple[int, int]:
    """FLOPs of the part of ``parent`` before its last ``layers`` layers (shared by members that differ
    only there) and of the rest (run once per member); ``None``: nothing is shared."""
    shape = input_shape(parent)
    total = forward_flops(parent, shape)
    if layers is None:
        return 0, total
    names = {f"model.{n}" for group in last_layers(parent, layers) for n in group}
    prefix, _, _, _ = split_shared_prefix(FeaturesAndLogits(parent).eval(), names)
    if prefix is None:
        return 0, total
    device = next(parent.parameters()).device
    with FlopCounterMode(display=False) as counter:
        prefix(torch.zeros(1, *shape, device=device))
    shared = int(counter.get_total_flops())
    return shared, total - shared


def predicted_ratio(split: tuple[int, int], members: int) -> float:
    """The FLOPs ratio of ``members`` members sharing ``split[0]`` and each running ``split[1]``."""
    shared, own = split
    return (shared + members * own) / max(shared + own, 1)


def fits(ratio: float, budget: float) -> bool:
    """Whether a FLOPs ratio is within a budget, compared at two decimals."""
    return round(ratio, 2) <= budget + 1e-9


@torch.no_grad()
def time_ratio(module: nn.Module, parent: nn.Module, batch: int = 16, rounds: int = 3, seconds: float = 0.2) -> float:
    """Forward time of ``module`` over its parent's on random inputs at ``batch``, alternating the two over
    ``rounds`` rounds and taking the median of each (the machines are shared and noisy)."""
    device = next(parent.parameters()).device
    x = torch.randn(batch, *input_shape(parent), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[int, list[float]] = {0: [], 1: []}
    for m in (module, parent):
        m.eval()(x)  # warm-up
    for _ in range(rounds):
        for i, m in enumerate((module, parent)):
            n, start = 0, time.perf_counter()
            while n == 0 or time.perf_counter() - start < seconds:
                m(x)
                synchronize(device)
                n += 1
            times[i].append((time.perf_counter() - start) / n)
    return statistics.median(times[0]) / statistics.median(times[1])


def cost_summary(module: nn.Module, parent: nn.Module, measure_time: bool = True) -> dict[str, Any]:
    """Members, test-time views, stored parameters, FLOPs ratio (and measured time ratio) of an artifact against
    its parent (the FLOPs and time of V views are V passes through the member-specific part)."""
    out: dict[str, Any] = {
        "members": int(getattr(module, "num_members", 1)),
        "views": len(getattr(module, "views", ("identity",))),
        "parameters": int(
            module.num_parameters() if hasattr(module, "num_parameters") else sum(p.numel() for p in module.parameters())
        ),
        "flops_ratio": round(flops_ratio(module, parent), 4),
    }
    if measure_time:
        out["time_ratio"] = round(time_ratio(module, parent), 3)
    return out


def widest_fit(
    parent: nn.Module, budget: float, members: int, min_members: int = 4, layers: list[int | None] | None = None
) -> tuple[int | None, int]:
    """The widest member-specific part and the most members (up to ``members``) that fit ``budget``.

    Candidates (``layers``) go from the whole network (``None``) to the classifier alone
    (``--last-layers 1``); the first where at least ``min(min_members, members)`` members fit wins, with
    as many members as fit. Wider parts give more diverse members; more members average more of them.
    """
    from .timm_io import layer_count

    candidates = layers if layers is not None else [None, *range(layer_count(parent), 0, -1)]
    want = min(min_members, members)
    for layers_ in candidates:
        split = split_flops(parent, layers_)
        fitting = [k for k in range(members, 0, -1) if fits(predicted_ratio(split, k), budget)]
        if fitting and fitting[0] >= want:
            return layers_, fitting[0]
    return candidates[-1], max(1, min(members, want))
