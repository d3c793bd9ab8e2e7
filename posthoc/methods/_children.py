"""Shared machinery of children tuned from one parent (``sparse``): per-child diversity draws, and the
tuning of one child (:func:`tune_child`: masks held by a parametrization while tuning, subnetwork
annealing, the optimizer of :func:`posthoc.training.fine_tune_recipe`, the shared training loop, BatchNorm
re-estimation).

Children re-tuned from one checkpoint stay in its basin, and what they add to an ensemble is as much as
test-time flips or longer training add to the parent. Each child can be given its own training problem,
so that every epoch spent on it buys diversity:

- ``hyper`` (Wenzel et al. 2020, hyper-deep ensembles): each child draws its own label smoothing,
  weight decay and augmentation strength, from ranges that keep a fine-tuned member accurate
  (:data:`LABEL_SMOOTHING`, :data:`WEIGHT_DECAY_FACTOR`, :data:`PAD_FRACTION`, :data:`TIMM_SCALE`).
  Wenzel et al. tune the ranges per task by random search and train each member from scratch; here the
  members are short fine-tunes, so the ranges sit around the method's own defaults (label smoothing from
  0, the weight decay within a factor of a few of the family default, the pad-crop around timm's 1/8).
- ``classweights`` (Franchi et al. 2024, random class-weighted losses): each child's cross-entropy
  weights class c by ``w_c = C * d_c``, ``d ~ Dirichlet(concentration)`` over the C classes, so the
  weights have mean 1 and a spread of about ``1 / sqrt(concentration)``. The paper's weights are a
  random draw per member; which distribution is not fixed by it: a symmetric Dirichlet keeps the mean
  exactly 1 and has one knob.

Every draw depends on the child's seed alone (the run's seed and the child's index), never on other
children, so children stay independent (torchrun tunes them in parallel) and the same seed gives the
same bytes. Drawn values are rounded (4 significant digits) before use, so what the artifact records is
exactly what was trained with. The losses run in the shared engine (:func:`posthoc.training.train_steps`'s
``loss_fn``).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..runtime import derive_seed, seeded_generator
from ..timm_io import last_layers
from ..training import ImageBatches, Recipe, cycle, fine_tune_optimizer, has_batchnorm, recalibrate_bn, train_steps
from .base import BoostContext

DIVERSITY = ("none", "hyper", "classweights")
LABEL_SMOOTHING = (0.0, 0.2)  # uniform: 0.1 is timm's default; members stay accurate up to 0.2
WEIGHT_DECAY_FACTOR = (0.2, 2.0)  # log-uniform factor on the weight decay (SGD 5e-4: [1e-4, 1e-3]; AdamW 0.05: [0.01, 0.1])
PAD_FRACTION = (1 / 16, 1 / 4)  # uniform: the light augmentation's reflect-pad, a fraction of the side (default 1/8)
TIMM_SCALE = (0.08, 0.5)  # uniform: timm augmentation's smallest crop area (default 0.08: its strongest)


def ranges() -> dict[str, Any]:
    """The hyper-parameter ranges of ``hyper`` (what the artifact records next to the draws)."""
    return {
        "label_smoothing": {"uniform": list(LABEL_SMOOTHING)},
        "weight_decay": {"log_uniform_factor": list(WEIGHT_DECAY_FACTOR)},
        "light_pad_fraction": {"uniform": [round(v, 4) for v in PAD_FRACTION]},
        "timm_min_scale": {"uniform": list(TIMM_SCALE)},
    }


def _round(x: float) -> float:
    return float(f"{x:.4g}")


@dataclass(frozen=True)
class ChildDraw:
    """One child's own training problem: label smoothing, weight decay (``None``: the recipe's),
    augmentation (``None``: the configured one; else ``light:F`` or ``timm:S``, see
    :func:`posthoc.data.train_transform`) and class weights (``None``: all 1)."""

    label_smoothing: float = 0.0
    weight_decay: float | None = None
    augment: str | None = None
    class_weights: tuple[float, ...] | None = None

    def record(self) -> dict[str, Any]:
        """The drawn values, for the artifact's measured notes."""
        out: dict[str, Any] = {}
        if self.label_smoothing or self.weight_decay is not None:
            out["label_smoothing"] = self.label_smoothing
        if self.weight_decay is not None:
            out["weight_decay"] = self.weight_decay
        if self.augment is not None:
            out["augment"] = self.augment
        if self.class_weights is not None:
            out["class_weights"] = list(self.class_weights)
        return out

    def loss(self) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None:
        """The child's loss for :func:`posthoc.training.train_steps` (``None``: the plain cross-entropy)."""
        if not self.label_smoothing and self.class_weights is None:
            return None
        weight = None if self.class_weights is None else torch.tensor(self.class_weights, dtype=torch.float32)
        smoothing = self.label_smoothing

        def loss_fn(logits: torch.Tensor, y: torch.Tensor, _inputs: Any) -> torch.Tensor:
            w = None if weight is None else weight.to(logits.device)
            return F.cross_entropy(logits, y, weight=w, label_smoothing=smoothing)

        return loss_fn


def draw_child(
    kind: str, child_seed: int, *, weight_decay: float, augment: str, num_classes: int, concentration: float
) -> ChildDraw:
    """Child's draw of diversity ``kind`` (``none``, ``hyper``, ``classweights``) from its seed alone.

    ``hyper``: label smoothing ~ U(:data:`LABEL_SMOOTHING`); weight decay ``weight_decay`` times a
    log-uniform factor in :data:`WEIGHT_DECAY_FACTOR` (0 stays 0); augmentation strength ``light:F`` with
    F ~ U(:data:`PAD_FRACTION`), ``timm:S`` with S ~ U(:data:`TIMM_SCALE`), and ``none`` kept.
    ``classweights``: ``C * Dirichlet(concentration * ones(C))``.
    """
    if kind == "none":
        return ChildDraw()
    if kind == "classweights":
        rng = np.random.default_rng(derive_seed(child_seed, 4))
        weights = rng.dirichlet(np.full(num_classes, concentration)) * num_classes
        return ChildDraw(class_weights=tuple(_round(float(w)) for w in weights))
    u = torch.rand(3, generator=seeded_generator(child_seed, 3), dtype=torch.float64).tolist()
    smoothing = _round(LABEL_SMOOTHING[0] + u[0] * (LABEL_SMOOTHING[1] - LABEL_SMOOTHING[0]))
    lo, hi = (math.log(f) for f in WEIGHT_DECAY_FACTOR)
    decay = _round(weight_decay * math.exp(lo + u[1] * (hi - lo)))
    family = str(augment).partition(":")[0]
    if family == "light":
        augment = f"light:{_round(PAD_FRACTION[0] + u[2] * (PAD_FRACTION[1] - PAD_FRACTION[0]))}"
    elif family == "timm":
        augment = f"timm:{_round(TIMM_SCALE[0] + u[2] * (TIMM_SCALE[1] - TIMM_SCALE[0]))}"
    return ChildDraw(label_smoothing=smoothing, weight_decay=decay, augment=augment)


def num_classes(model: nn.Module) -> int:
    """Classes of a timm model (its ``num_classes``, else its classifier's outputs)."""
    n = getattr(model, "num_classes", None)
    return int(n) if n else int(model.get_classifier().out_features)


# ------------------------------------------------------------------------------------ masks while tuning
@dataclass
class ChildMask:
    """What one child keeps: per tensor a 0/1 ``mask``, and ``score`` in [0, 1] (the uniform draw the
    mask thresholds, seen from this sibling), which the random annealing schedule starts from."""

    mask: dict[str, torch.Tensor]
    score: dict[str, torch.Tensor]


class Masked(nn.Module):
    """Parametrization ``weight = stored * mask``: ``mask`` is the child's own, or a per-minibatch sample
    while annealing. Only the forward pass sees it; the stored weight is never overwritten."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


class Annealer:
    """Draws every minibatch's forward masks of an annealed child (thesis ch. 6).

    ``temperature``: keep probability 1 for kept weights and ``tau`` for pruned ones, tau cosine-annealed
    from ``tau0`` to 0 over ``steps``; ``random``: probability ``(1 - a) * score + a * mask`` with ``a``
    rising linearly from 0 to 1. At the last step the sampled mask is the child's mask exactly.
    """

    def __init__(self, child: ChildMask, params: dict[str, Masked], cfg: Any, steps: int, seed: int):
        self.child, self.params, self.cfg, self.steps = child, params, cfg, max(1, steps)
        self.gen = seeded_generator(seed)

    def probability(self, name: str, step: int) -> torch.Tensor:
        t = min(step, self.steps) / self.steps
        mask = self.child.mask[name].float()
        if self.cfg.anneal == "temperature":
            tau = self.cfg.tau0 * 0.5 * (1 + math.cos(math.pi * t))
            return mask + (1 - mask) * tau
        return (1 - t) * self.child.score[name].float() + t * mask

    def draw(self, step: int) -> None:
        """Set every parametrization's mask for the batch after optimizer step ``step`` (0: the first)."""
        for name, masked in self.params.items():
            if step >= self.steps:
                masked.mask.copy_(self.child.mask[name])
                continue
            prob = self.probability(name, step)
            sample = torch.rand(prob.shape, generator=self.gen) < prob.cpu()
            masked.mask.copy_(sample.to(masked.mask.device))


# ------------------------------------------------------------------------------------ one child
def child_seed(cfg: Any, index: int) -> int:
    """The seed of child ``index``: every draw of the child (data order, bootstrap sample, annealing,
    augmentation, diversity) comes from it."""
    return derive_seed(cfg.seed, 1000 + index)


def child_draw(parent: nn.Module, cfg: Any, recipe: Recipe, index: int) -> ChildDraw:
    """Child ``index``'s own training problem under ``--child-diversity`` (:func:`~posthoc.methods._children.draw_child`)."""
    return draw_child(
        cfg.child_diversity,
        child_seed(cfg, index),
        weight_decay=recipe.weight_decay,
        augment=cfg.augment,
        num_classes=num_classes(parent) if cfg.child_diversity == "classweights" else 0,
        concentration=cfg.class_weight_concentration,
    )


def tune_child(
    parent: nn.Module,
    child: ChildMask | None,
    cfg: Any,
    ctx: BoostContext,
    index: int,
    recipe: Recipe,
) -> tuple[nn.Module, dict[str, Any]]:
    """Child ``index``: ``parent`` (the parent, or the previous cycle's end on a trajectory) with ``child``'s
    mask (``None``: dense), tuned on the training split with ``recipe``'s optimizer, and the loss, weight
    decay and augmentation of its diversity draw (:func:`child_draw`).

    Independent of every other child (its data order, bootstrap sample, annealing, augmentation and
    diversity draws come from (seed, index)), so children can be tuned anywhere in any order: under
    torchrun each process tunes its own share. Returns the child in eval mode, its pruned weights exactly
    zero and its BatchNorm statistics re-estimated, and a summary.
    """
    seed = child_seed(cfg, index)
    with torch.random.fork_rng(devices=[]):  # augmentations draw from the global generator: seed it per child
        torch.manual_seed(seed)
        return _tune(parent, child, cfg, ctx, index, seed, recipe, child_draw(parent, cfg, recipe, index))


def _tune(
    parent: nn.Module,
    child: ChildMask | None,
    cfg: Any,
    ctx: BoostContext,
    index: int,
    seed: int,
    recipe: Recipe,
    draw: ChildDraw,
) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(parent).train()
    frozen_bn = _freeze_outside(model, cfg.last_layers)
    masked: dict[str, Masked] = {}
    for name, mask in (child.mask if child is not None else {}).items():
        owner, _, attr = name.rpartition(".")
        masked[name] = Masked(mask)
        parametrize.register_parametrization(model.get_submodule(owner), attr, masked[name])
    sample = None
    if cfg.bootstrap:
        sample = torch.randint(0, ctx.train_size, (ctx.train_size,), generator=seeded_generator(seed, 1)).tolist()
    loader = ctx.train_loader(cfg.batch_size, seed=seed, augment=draw.augment or cfg.augment, sample=sample)
    steps = max(1, round(cfg.child_epochs * len(loader)))
    if draw.weight_decay is not None:
        recipe = dataclasses.replace(recipe, weight_decay=draw.weight_decay)
    opt, sched = fine_tune_optimizer(
        model,
        steps,
        recipe,
        schedule="onecycle" if cfg.schedule == "trajectory" else cfg.schedule,
        momentum=cfg.momentum,
        pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
    )
    annealer = None
    if cfg.anneal != "none" and child is not None:
        anneal_steps = round(min(cfg.anneal_epochs, cfg.child_epochs) / cfg.child_epochs * steps)
        annealer = Annealer(child, masked, cfg, anneal_steps, derive_seed(seed, 2))
        annealer.draw(0)
    for bn in frozen_bn:  # the shared trunk keeps the parent's statistics
        bn.eval()
    losses = train_steps(
        model,
        cycle(loader, steps),
        opt,
        steps=steps,
        scheduler=sched,
        loss_fn=draw.loss(),
        device=ctx.device,
        amp=ctx.amp,
        after_step=annealer.draw if annealer else None,
        show_progress=ctx.show_progress,
        description=f"child {index + 1}/{cfg.children}",
    )
    for name, m in masked.items():  # the stored weight times the child's mask, exactly
        m.mask.copy_(child.mask[name])
        owner, _, attr = name.rpartition(".")
        parametrize.remove_parametrizations(model.get_submodule(owner), attr, leave_parametrized=True)
    model.eval()
    if cfg.bn_batches and has_batchnorm(model):
        batches = ImageBatches(lambda: ctx.train_loader(128, seed=cfg.seed, augment="none"), cfg.bn_batches)
        tuned = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen_bn]
        recalibrate_bn(model, batches, ctx.device, modules=tuned if frozen_bn else None)
    window = max(1, len(losses) // 10)
    summary = {
        "steps": len(losses),
        "first_loss": round(sum(losses[:window]) / window, 5),
        "last_loss": round(sum(losses[-window:]) / window, 5),
    }
    if draw.record():
        summary["draw"] = draw.record()
    return model, summary


def _freeze_outside(model: nn.Module, layers: int | None) -> list[nn.Module]:
    """Freeze every parameter outside the last ``layers`` layers (``None``: nothing); return the BatchNorm
    layers outside them, which must keep the parent's statistics so the trunk stays shared."""
    if layers is None:
        return []
    scope = {n for group in last_layers(model, layers) for n in group}
    for name, p in model.named_parameters():
        p.requires_grad_(name in scope)
    owners = {n.rsplit(".", 1)[0] for n in scope}
    return [m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in owners]
