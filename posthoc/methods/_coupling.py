"""The SuperNet coupling layer (Bukowski 2020, §3.2): one linear layer over the members' concatenated
penultimate features, trained on their cached training features; shared by ``supernet`` and
``sparse --couple``.

- **Initialisation**: the members' classifier weights side by side divided by ``--coupling-divisor``
  (default K: exactly logit averaging before training), biases averaged; the thesis also tried larger
  divisors, and 1 is its "copied, not scaled" variant.
- **Training**: a fresh optimizer at a cosine-annealed rate; the epoch with the best select NLL after
  fitting its own temperature is kept, epoch 0 included (the members were trained on the very images the
  layer is trained on, so the layer grows overconfident while its ranking improves).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..ensemble import Combine, Ensemble
from ..options import option
from ..training import CachedData, batches_of, epoch_order, run_cached, train_epochs
from ._layerwise import OPTIMIZERS
from .base import BoostContext, MethodConfig


@dataclass
class CouplingConfig(MethodConfig):
    """Options of the coupling layer (shared with ``sparse --couple``)."""

    coupling_divisor: float | None = option(
        None,
        "Coupling init: stacked member classifiers divided by this (default: the number of members K = logit averaging).",
        gt=0,
    )
    l2: float = option(0.0, "L2 penalty l2 * sum(w^2) on the coupling layer's weight and bias.", ge=0)
    coupling_epochs: int = option(10, "Epochs of coupling-layer training (the best by select NLL is kept).", ge=0)
    coupling_optimizer: str = option("adam", "Optimizer of the coupling layer: adam or sgd (momentum 0.9).", choices=OPTIMIZERS)
    coupling_lr: float = option(1e-4, "Learning rate of the coupling layer (cosine-annealed).", gt=0)


def coupling_init(classifiers: list[nn.Module], divisor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupling layer's start: classifier weights side by side (member order) divided by
    ``divisor``, biases averaged (thesis §3.2). With ``divisor = K`` it computes the mean of the logits."""
    weight = torch.cat([c.weight.detach().float().cpu() for c in classifiers], dim=1) / divisor
    biases = [c.bias.detach().float().cpu() if c.bias is not None else torch.zeros(c.weight.shape[0]) for c in classifiers]
    return weight, torch.stack(biases).mean(0)


def couple(
    models: list[nn.Module],
    names: list[str],
    train_feats: list[torch.Tensor],
    train_y: torch.Tensor,
    sel_feats: list[torch.Tensor],
    sel_y: torch.Tensor,
    cfg: CouplingConfig,
    ctx: BoostContext,
    *,
    batch_size: int = 128,
    calibrated: bool = True,
) -> Ensemble:
    """Train the coupling layer over the members' features and return the coupled ensemble.

    ``train_feats`` / ``sel_feats`` are each member's penultimate features (``forward_head(pre_logits=
    True)``) on the training images and the select part, in the order of ``models``. The layer starts
    at :func:`coupling_init`, trains with a fresh optimizer for ``cfg.coupling_epochs`` epochs and keeps
    the epoch with the best select NLL (after its own temperature when ``calibrated``: the members were
    trained on the same images, so the layer grows overconfident while its ranking improves, and boost
    fits the final temperature).
    """
    classifiers = [m.get_classifier() for m in models]
    divisor = cfg.coupling_divisor if cfg.coupling_divisor is not None else float(len(models))
    weight, bias = coupling_init(classifiers, divisor)
    layer = nn.Linear(weight.shape[1], weight.shape[0]).to(ctx.device)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    f_train, f_sel = torch.cat(train_feats, dim=1), torch.cat(sel_feats, dim=1)
    data = CachedData((f_train,), train_y)
    order = torch.arange(len(train_y))

    def batches(epoch):
        return data.batches(epoch_order(order, cfg.seed + 7, epoch), batch_size, None, ctx.device, epoch)

    def select_logits():
        return run_cached(lambda e: layer(e[0]), (f_sel,), ctx.device)[0], sel_y

    best, history = train_epochs(
        lambda e: layer(e[0]),
        list(layer.parameters()),
        batches,
        select_logits,
        epochs=cfg.coupling_epochs,
        optimizer=cfg.coupling_optimizer,
        lr=cfg.coupling_lr,
        l2=cfg.l2,
        steps_per_epoch=len(batches_of(order, batch_size)),
        select_by="nll",
        calibrated=calibrated,
        amp=ctx.amp,
        device=ctx.device,
        show_progress=ctx.show_progress,
        description="coupling",
    )
    ctx.note("coupling", {"divisor": divisor, "features": int(weight.shape[1]), "best_epoch": best, "select": history})
    kept = history[best]
    ctx.log(
        f"coupling layer ({weight.shape[1]} features -> {weight.shape[0]} classes): best epoch {best}, "
        f"select top-1 {kept['top1']:.2f}% NLL {kept['nll']:.4f} ECE {kept['ece']:.2f}%"
    )
    # members are grouped by architecture; the coupling columns follow the grouped member order
    groups = Ensemble.from_models(models, names).groups
    dims = [c.weight.shape[1] for c in classifiers]
    starts = [sum(dims[:i]) for i in range(len(dims))]
    w = layer.weight.detach().cpu()
    order_names = [n for g in groups for n in g.member_names]
    columns = [w[:, starts[names.index(n)] : starts[names.index(n)] + dims[names.index(n)]] for n in order_names]
    combine = Combine(
        rule="coupling",
        coupling_weight=torch.cat(columns, dim=1).contiguous(),
        coupling_bias=layer.bias.detach().cpu().clone(),
    )
    return Ensemble(groups=groups, combine=combine)
