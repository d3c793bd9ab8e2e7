"""Small training and inference helpers shared by the methods."""

from __future__ import annotations

import itertools
from typing import Iterable

import torch
from torch import nn
from torch.optim.swa_utils import update_bn

from .errors import PosthocError
from .runtime import progress


@torch.no_grad()
def collect_logits(
    model: nn.Module, loader: Iterable, device: torch.device, *, show_progress: bool = False, description: str = "forward"
) -> tuple[torch.Tensor, torch.Tensor]:
    """All logits (N, C) of ``model`` over ``loader`` (eval mode, float32, on CPU) and targets (N,)."""
    model.eval()
    logits, targets = [], []
    for x, y in progress(loader, description=description, enabled=show_progress):
        logits.append(model(x.to(device, non_blocking=True)).float().cpu())
        targets.append(y)
    return torch.cat(logits), torch.cat(targets)


@torch.no_grad()
def collect_inputs(loader: Iterable, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Materialise (up to ``limit``) images and targets of a loader, for repeated cheap passes."""
    xs, ys, n = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if limit is not None and n >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` holds a BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def recalibrate_bn(
    model: nn.Module,
    loader: Iterable,
    device: torch.device,
    max_batches: int | None = None,
    modules: list[nn.Module] | None = None,
) -> nn.Module:
    """Re-estimate BatchNorm running statistics on ``loader`` (SWA's ``update_bn``).

    ``torch.optim.swa_utils.update_bn`` resets the statistics and averages them over the batches
    (cumulative mean, momentum None). Batches may be tensors, ``(images, targets)`` tuples, or dicts
    with an ``image`` / ``pixel_values`` entry. With ``modules``, only those BatchNorm layers are
    re-estimated (the same cumulative average) and every other layer stays in eval mode. Leaves the
    model in eval mode.
    """
    if not has_batchnorm(model):
        return model

    def images():
        seen = 0
        for batch in itertools.islice(loader, max_batches):
            seen += 1
            if isinstance(batch, dict):
                batch = batch.get("image", batch.get("pixel_values"))
            elif isinstance(batch, (list, tuple)):
                batch = batch[0]
            yield batch.to(device)
        if not seen:
            raise PosthocError("BatchNorm recalibration got no training images; check the training split")

    if modules is None:
        update_bn(images(), model, device=device)
        return model.eval()
    if not modules:
        return model.eval()
    momenta = {m: m.momentum for m in modules}
    model.eval()
    for m in modules:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in images():
            model(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model.eval()
