"""Distillation: an ensemble artifact's gain in one network at the parent's inference cost.

``posthoc distill ART --data DIR --out OUT`` (and ``boost --distill``) trains a student, by default
the artifact's own parent, on the training split to match the artifact's predictions:

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

import dataclasses
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from timm.data.mixup import mixup_target
from torch.utils.data import DataLoader, Dataset

from . import data as data_mod
from .artifact import check_output, save
from .calibrate import calibrated
from .cost import flops_ratio
from .ensemble import Ensemble, Provenance
from .errors import PosthocError
from .evaluate import evaluate, headline
from .fused import EnsembleModule
from .metrics import PROB_FLOOR
from .runtime import derive_seed, resolve_device, seed_everything, seeded_generator
from .sources import is_artifact, load_artifact, load_model, member_name, storage_dtype
from .training import cache_outputs, cycle, sgd_with_schedule, train_steps

LOSSES = ("kd", "consensus")


@dataclass
class DistillConfig:
    """Options of ``posthoc distill`` (``boost --distill`` uses the same)."""

    epochs: float = 1.0
    temperature: float = 4.0
    alpha: float | None = None  # default: 0.9 for kd, 1.0 (the paper's SCE weight) for consensus
    consensus: bool = False
    cache_teacher: bool = False
    mixup: float = 0.0
    schedule: str = "onecycle"
    max_lr: float = 0.02
    weight_decay: float = 5e-4
    batch_size: int = 128
    augment: str = "light"
    seed: int = 0

    def __post_init__(self):
        if not self.epochs > 0:
            raise PosthocError(f"--epochs must be > 0, got {self.epochs}")
        if not self.temperature > 0:
            raise PosthocError(f"--temperature must be > 0, got {self.temperature}")
        if self.alpha is None:
            self.alpha = 1.0 if self.consensus else 0.9
        if not (self.alpha >= 0 and (self.consensus or self.alpha <= 1)):
            raise PosthocError(f"--alpha must be in [0, 1] for distillation (any >= 0 with --consensus), got {self.alpha}")
        if not self.mixup >= 0:
            raise PosthocError(f"--mixup must be >= 0 (0: off), got {self.mixup}")
        if self.mixup and self.cache_teacher:
            raise PosthocError("--mixup shows the teacher new mixed images every step; drop --cache-teacher")
        if not self.max_lr > 0 or self.weight_decay < 0 or self.batch_size < 1:
            raise PosthocError("--max-lr must be > 0, --weight-decay >= 0 and --batch-size >= 1")


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


def distill(
    teacher: str,
    data: str | Path,
    out: str | Path,
    *,
    student: str | None = None,
    config: DistillConfig | None = None,
    train_split: str = "train",
    val_split: str = "val",
    select_size: int | None = None,
    temperature_scaling: bool = True,
    device: str = "auto",
    workers: int | None = None,
    overwrite: bool = False,
    class_map: str | Path | None = None,
    skip_bad_images: bool = False,
    show_progress: bool = True,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Distill the artifact ``teacher`` into one network written as an artifact at ``out``.

    ``student`` defaults to the teacher's first source (the parent it was built from); any spec with the
    same classes works (e.g. a smaller timm model). The teacher is never changed. Returns the student's
    and teacher's metrics on the select part, the estimated cost in parent-epochs and ``out``.
    """
    cfg = config or DistillConfig()
    out = Path(out)
    data_mod.check_loader_options(workers=workers, select_size=select_size)
    check_output(out, overwrite)
    dev = resolve_device(device)
    if not is_artifact(teacher):
        raise PosthocError(f"{teacher} is not an ensemble artifact; distill the artifact that posthoc boost or ensemble wrote")
    ensemble_module = load_artifact(teacher).to(dev).eval()
    teacher_config = ensemble_module.posthoc_config
    sources = teacher_config.get("sources") or []
    student_spec = student or (sources[0] if sources else None)
    if student_spec is None:
        raise PosthocError(f"{teacher} records no source model to start the student from; pass --student SPEC")
    try:
        model = load_model(student_spec).to(dev)
    except PosthocError as e:
        if student:
            raise
        raise PosthocError(
            f"cannot load the teacher's recorded parent {student_spec!r} from {Path.cwd()} ({e}); pass --student SPEC"
        ) from None
    if getattr(model, "returns_probabilities", False):
        raise PosthocError(f"--student {student_spec} is an artifact; pass a checkpoint (one network) to train")
    if model.num_classes != ensemble_module.num_classes:
        raise PosthocError(
            f"the student predicts {model.num_classes} classes but the teacher {ensemble_module.num_classes}; use a student of the same label space"
        )
    labels = ensemble_module.pretrained_cfg.get("label_names")
    data_config = data_mod.resolve_data_config(model)
    tuned = teacher_config.get("data") or {}
    if select_size is None and tuned.get("tuned_on", "").partition(":")[0] == data_mod.SplitSpec.parse(val_split).split:
        select_size = tuned.get("select_size")
    select_spec = data_mod.SplitSpec(data_mod.SplitSpec.parse(val_split).split, "select")
    select_set = data_mod.open_split(
        data,
        select_spec,
        data_mod.eval_transform(data_config),
        label_names=labels,
        select_size=select_size,
        class_map=class_map,
        skip_bad=skip_bad_images,
    )
    train_set = data_mod.open_split(
        data,
        train_split,
        data_mod.train_transform(data_config, cfg.augment),
        label_names=labels,
        class_map=class_map,
        skip_bad=skip_bad_images,
    )
    select_loader = data_mod.make_loader(select_set, 256, workers=workers)
    seed_everything(cfg.seed)

    teacher_ratio = flops_ratio(ensemble_module, model)
    student_before = headline(evaluate(model, select_loader, device=dev, show_progress=False))
    teacher_metrics = headline(evaluate(ensemble_module, select_loader, device=dev, show_progress=False))
    workers_ = data_mod.default_workers() if workers is None else workers
    view = FixedViews(train_set, cfg.seed)
    per_epoch = len(DataLoader(view, batch_size=cfg.batch_size, drop_last=len(view) > cfg.batch_size))
    steps = max(1, round(cfg.epochs * per_epoch))
    teacher_passes = 1.0 if cfg.cache_teacher else cfg.epochs
    cost = cfg.epochs + teacher_passes * teacher_ratio / 3  # a training step ~ three forward passes
    log(
        f"distilling {teacher} ({ensemble_module.num_members} members, {teacher_ratio:.2f}x FLOPs) into {student_spec}: "
        f"{steps} steps ({cfg.epochs:g} epochs), about {cost:.2f} parent-epochs of compute"
    )

    @torch.no_grad()
    def teacher_log_probs(x: torch.Tensor) -> torch.Tensor:
        return ensemble_module(x).float().clamp_min(PROB_FLOOR).log()

    if cfg.cache_teacher:
        loader = DataLoader(view, batch_size=256, shuffle=False, num_workers=workers_, collate_fn=data_mod.collate_readable)
        (cached,), _ = cache_outputs(
            [lambda x: (teacher_log_probs(x),)],
            ((x, y) for x, y, _ in loader),
            dev,
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
        num_workers=workers_,
        drop_last=len(train_set) > cfg.batch_size,
        generator=seeded_generator(cfg.seed),
        collate_fn=data_mod.collate_readable,
    )
    batches = (((x, i), y) for x, y, i in cycle(train_loader, steps))
    if cfg.mixup:
        batches = mixed_batches(batches, cfg.mixup, model.num_classes, derive_seed(cfg.seed, 1))
    student_model = model.train()
    opt, sched = sgd_with_schedule(
        [p for p in student_model.parameters() if p.requires_grad],
        steps,
        schedule=cfg.schedule,
        max_lr=cfg.max_lr,
        weight_decay=cfg.weight_decay,
    )
    losses = train_steps(
        lambda inputs: student_model(inputs[0]),
        batches,
        opt,
        steps=steps,
        scheduler=sched,
        loss_fn=loss_fn,
        device=dev,
        show_progress=show_progress,
        description="distill",
    )
    student_model.eval()

    ensemble = Ensemble.from_models([student_model], [member_name(student_spec)])
    measured: dict[str, Any] = {
        "teacher": str(teacher),
        "teacher_members": ensemble_module.num_members,
        "teacher_flops_ratio": round(teacher_ratio, 4),
        "teacher_select": teacher_metrics,
        "student_select_before": student_before,
        "steps": len(losses),
        "first_loss": round(sum(losses[: max(1, len(losses) // 10)]) / max(1, len(losses) // 10), 5),
        "last_loss": round(sum(losses[-max(1, len(losses) // 10) :]) / max(1, len(losses) // 10), 5),
        "cost_parent_epochs": round(cost, 3),
    }
    if temperature_scaling:
        ensemble, fit = calibrated(ensemble, select_loader, dev)
        measured["temperature"] = fit
    student_after = headline(evaluate(EnsembleModule(ensemble).to(dev), select_loader, device=dev, show_progress=False))
    provenance = Provenance(
        method="distill",
        config={"teacher": str(teacher), "student": student_spec, **dataclasses.asdict(cfg)},
        measured=measured,
        sources=[student_spec],
        data=data_mod.data_record(data, train_split, select_spec, len(select_set), data_config),
        metrics={
            str(select_spec): student_after,
            f"teacher on {select_spec}": teacher_metrics,
            f"parent on {select_spec}": student_before,
        },
        command=command,
    )
    save(ensemble, out, provenance, overwrite=overwrite, dtype=storage_dtype([model]))
    return {
        "out": str(out),
        "student": student_after,
        "teacher": teacher_metrics,
        "before": student_before,
        "cost_parent_epochs": cost,
        "teacher_flops_ratio": teacher_ratio,
    }


class _Indexed(Dataset):
    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        return None if item is None else (*item, i)
