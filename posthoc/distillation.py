"""Distillation: training one network to match an ensemble's predictions (``posthoc distill``, ``boost --distill``).

A student is trained on the training split to match the teacher's combined probabilities:

- **knowledge distillation** (default; Hinton et al. 2015): ``alpha * T^2 * KL(teacher_T || student_T)
  + (1 - alpha) * CE(labels, student)``, where ``teacher_T`` softens the artifact's combined
  probabilities ``p`` as ``p^(1/T)`` normalised (its log-probabilities divided by T, the ensemble's
  own temperature included) and ``student_T`` is ``softmax(logits / T)``;
- **consensus** (``--consensus``; Noel 2017, "A Collaborative Approach to Deep Learning"): the student's
  cross-entropy on the labels plus ``alpha`` times the symmetric cross-entropy between its softmax and the
  ensemble's consensus, ``-sum(p_s log p + p log p_s)``, with the paper's weight for that loss (alpha 1)
  and no temperature (the paper uses none). Our reading: the paper trains its members jointly with
  gradients into both; here the consensus is the frozen artifact and only the student learns.

The teacher runs on every augmented training batch through the fused artifact, or once over a fixed
view of every image with ``--cache-teacher`` (each image keeps one seeded crop and flip in every epoch,
so one teacher pass serves all epochs). ``--mixup A`` mixes each batch with its reverse at a Beta(A, A)
weight before the teacher sees it ("function matching", Beyer et al. 2022: student and teacher are
compared on the same mixed images, between classes, where the ensemble's members disagree most); the
labels' cross-entropy then takes the mixed one-hot targets (timm's ``mixup_target``). Mixed images need
the teacher on the fly, so ``--mixup`` excludes ``--cache-teacher``. The result is an ordinary
one-member artifact that records its teacher; its cost is estimated in parent-epochs from FLOPs (a
training step counts as three forward passes).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from torch import nn
from torch.utils.data import DataLoader, Dataset

from . import data as data_mod
from .command_options import DistillConfig
from .metrics import PROB_FLOOR
from .runtime import derive_seed, seeded_generator
from .training import FINE_TUNE_RATES, Recipe, cache_outputs, cycle, fine_tune_optimizer, fine_tune_recipe, train_steps


def distillation_loss(
    student_logits: torch.Tensor, teacher_log_probs: torch.Tensor, y: torch.Tensor, cfg: DistillConfig
) -> torch.Tensor:
    """The loss of one batch: knowledge distillation at ``cfg.temperature``, or the consensus loss."""
    if cfg.consensus:
        p = teacher_log_probs.exp()
        log_s = student_logits.log_softmax(-1)
        sce = -(log_s.exp() * teacher_log_probs + p * log_s).sum(-1).mean()
        return F.cross_entropy(student_logits, y) + cfg.alpha * sce
    t = cfg.temperature
    soft_teacher = (teacher_log_probs / t).log_softmax(-1)
    kd = F.kl_div((student_logits / t).log_softmax(-1), soft_teacher, log_target=True, reduction="batchmean") * t * t
    return cfg.alpha * kd + (1 - cfg.alpha) * F.cross_entropy(student_logits, y)


def mixed_batches(
    batches: Iterable[tuple[Any, torch.Tensor]], alpha: float, num_classes: int, seed: int
) -> Iterator[tuple[Any, torch.Tensor]]:
    """Mixup of every batch with its reverse (timm's "batch" mode): images ``lam x + (1 - lam) x.flip(0)``,
    targets timm's ``mixup_target`` (mixed one-hot), ``lam ~ Beta(alpha, alpha)`` from a generator seeded
    by ``seed``. An odd batch loses its last image so that no image is mixed with itself."""
    rng = np.random.default_rng(seed)
    for (x, i), y in batches:
        if len(x) % 2:
            x, i, y = x[:-1], i[:-1], y[:-1]
        if not len(x):
            continue
        lam = float(rng.beta(alpha, alpha))
        yield (x.mul(lam).add_(x.flip(0), alpha=1 - lam), i), mixup_target(y, num_classes, lam)


class FixedViews(Dataset):
    """A dataset whose random augmentation is drawn once per image: item ``i`` always gets the same crop and
    flip (torch's generator seeded by (seed, i)), and comes with its index."""

    def __init__(self, dataset: Dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(derive_seed(self.seed, i))
            item = self.dataset[i]
        return None if item is None else (*item, i)


def train_student(
    student: nn.Module,
    teacher: nn.Module,
    train_set: Dataset,
    cfg: DistillConfig,
    device: torch.device,
    *,
    workers: int | None = None,
    show_progress: bool = True,
) -> list[float]:
    """Train ``student`` (in place) to match ``teacher``'s probabilities on ``train_set`` (augmented images);
    return every step's loss. The teacher runs on every batch, or once over one fixed view of every image
    with ``cache_teacher``; ``mixup`` mixes each batch first."""
    workers = data_mod.default_workers() if workers is None else workers
    view = FixedViews(train_set, cfg.seed)
    steps = student_steps(len(train_set), cfg)

    @torch.no_grad()
    def teacher_log_probs(x: torch.Tensor) -> torch.Tensor:
        return teacher(x).float().clamp_min(PROB_FLOOR).log()

    if cfg.cache_teacher:
        loader = DataLoader(view, batch_size=256, shuffle=False, num_workers=workers, collate_fn=data_mod.collate_readable)
        (cached,), _ = cache_outputs(
            [lambda x: (teacher_log_probs(x),)],
            ((x, y) for x, y, _ in loader),
            device,
            show_progress=show_progress,
            description="teacher (fixed views)",
        )
        targets = cached[0]

        def loss_fn(logits, y, inputs):
            return distillation_loss(logits, targets[inputs[1].cpu()].to(logits.device), y, cfg)
    else:

        def loss_fn(logits, y, inputs):
            return distillation_loss(logits, teacher_log_probs(inputs[0]), y, cfg)

    train_loader = DataLoader(
        view if cfg.cache_teacher else _Indexed(train_set),
        batch_size=cfg.batch_size,
        shuffle=True,
        num_workers=workers,
        drop_last=len(train_set) > cfg.batch_size,
        generator=seeded_generator(cfg.seed),
        collate_fn=data_mod.collate_readable,
    )
    batches = (((x, i), y) for x, y, i in cycle(train_loader, steps))
    if cfg.mixup:
        batches = mixed_batches(batches, cfg.mixup, student.num_classes, derive_seed(cfg.seed, 1))
    student.train()
    opt, sched = fine_tune_optimizer(student, steps, student_recipe(student, cfg), schedule=cfg.schedule)
    losses = train_steps(
        lambda inputs: student(inputs[0]),
        batches,
        opt,
        steps=steps,
        scheduler=sched,
        loss_fn=loss_fn,
        device=device,
        show_progress=show_progress,
        description="distill",
    )
    student.eval()
    return losses


def student_recipe(student: nn.Module, cfg: DistillConfig) -> Recipe:
    """The student's optimizer by the shared rule (:func:`posthoc.training.fine_tune_recipe`): SGD at 0.02
    for a BatchNorm student, AdamW at 1e-4 for any other, unless given."""
    return fine_tune_recipe(student, FINE_TUNE_RATES["distill"], cfg.optimizer, cfg.max_lr, cfg.weight_decay)


def student_steps(images: int, cfg: DistillConfig) -> int:
    """Optimizer steps of ``cfg.epochs`` epochs over ``images`` training images."""
    per_epoch = len(range(0, images, cfg.batch_size)) if images <= cfg.batch_size else images // cfg.batch_size
    return max(1, round(cfg.epochs * per_epoch))


def distillation_cost(cfg: DistillConfig, teacher_flops_ratio: float) -> float:
    """Compute of distillation in parent-epochs, from FLOPs: the student's epochs plus the teacher's passes
    (a training step counts as three forward passes)."""
    teacher_passes = 1.0 if cfg.cache_teacher else cfg.epochs
    return cfg.epochs + teacher_passes * teacher_flops_ratio / 3


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (*item, i)
