"""The evaluation loop: any module over any loader, timm-style results plus calibration metrics.

The result fields follow timm's ``validate.py`` (``model``, ``top1``, ``top1_err``, ``top5``,
``top5_err``, ``param_count`` in millions, ``img_size``, ``crop_pct``, ``interpolation``), plus
``nll``, ``ece`` (%), ``brier`` and ``throughput``. ``throughput`` is images per second of the model's
forward passes alone (the clock stops around each batch's forward, synchronised on CUDA), so it does
not depend on how fast the disk decodes JPEGs. For an ensemble, ``members``, ``member_top1`` and
``disagreement`` (%) are added. ``posthoc eval`` is :mod:`posthoc.commands.eval`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from . import distributed
from .errors import PosthocError
from .labels import check_data_classes
from .metrics import ClassificationMetrics, EnsembleMetrics
from .runtime import autocast, model_errors, progress, synchronize


def is_ensemble(model: nn.Module) -> bool:
    """True for modules whose forward returns probabilities and accepts ``return_members``."""
    return bool(getattr(model, "returns_probabilities", False))


def predict(model: nn.Module, images: torch.Tensor, members: bool = False):
    """Class probabilities (B, C) of a plain classifier or an ensemble; with ``members=True`` also
    per-member probabilities (K, B, C) (``None`` for a plain classifier)."""
    if is_ensemble(model):
        if members:
            probs, member_probs = model(images, return_members=True)
            return probs.float(), member_probs.float()
        return model(images).float()
    probs = torch.softmax(model(images).float(), dim=-1)
    return (probs, None) if members else probs


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader,
    *,
    device: torch.device = torch.device("cpu"),
    dtype: torch.dtype = torch.float32,
    amp: bool = False,
    channels_last: bool | None = None,
    data_config: dict[str, Any] | None = None,
    valid_labels: Sequence[int] | None = None,
    real_labels: Sequence[Sequence[int]] | None = None,
    show_progress: bool = True,
    description: str = "eval",
    tuned: frozenset[int] | None = None,
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return timm-style results plus calibration metrics.

    ``data_config`` (from :func:`posthoc.data.resolve_data_config`) fills ``img_size``, ``crop_pct``
    and ``interpolation`` as timm's ``validate.py`` reports them. ``reliability`` holds the per-bin
    confidence and accuracy behind the ECE.

    ``valid_labels`` (timm's ``validate.py`` option) are the model's class indices the data's classes
    are, in the data's class order (e.g. the 200 ImageNet-A classes of a 1000-class model): predictions
    are the model's probabilities restricted to them and renormalised, ``p(y | y in valid)``, for an
    ensemble as for one network. ``real_labels`` (ImageNet-ReaL) give every image, in loader order, the
    set of labels counted correct: ``top1`` / ``top5`` are then ReaL accuracies over the images with a
    non-empty set (timm's convention) and ``top1_original`` the plain one. ``channels_last`` (default:
    on CUDA) feeds the model channels-last tensors.

    A loader whose batches are split among processes (``make_loader(..., shard="batches")``, as
    :func:`posthoc.commands.eval.evaluate_spec` makes under torchrun) is evaluated in parallel: the per-batch sums of every
    process are added in batch order, so every metric equals the single-process one exactly;
    ``throughput`` is the sum of the processes' and an error on one process is raised on all.

    ``tuned``: the digests (as integers) of the images an artifact was tuned on, for a loader whose
    dataset yields each image's digest (``ImageSet.with_digests``); ``tuned_images`` then counts the
    evaluated images among them. A model whose outputs are not finite for any image gets no metrics but
    one line (:func:`posthoc.metrics.check_finite_outputs`); one that cannot run on the inputs too.
    """
    channels_last = device.type == "cuda" if channels_last is None else channels_last
    model = model.to(device=device, dtype=dtype).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    data_classes = len(loader.dataset.classes)
    model_classes = int(getattr(model, "num_classes", 0) or 0)
    expected = len(valid_labels) if valid_labels is not None else model_classes
    if valid_labels is not None and (min(valid_labels) < 0 or max(valid_labels) >= model_classes > 0):
        raise PosthocError(f"--valid-labels names classes outside the model's 0..{model_classes - 1}; check the file")
    if model_classes:
        check_data_classes(expected, data_classes, "--valid-labels lists" if valid_labels is not None else "the model predicts")
    valid = torch.as_tensor(list(valid_labels), dtype=torch.long) if valid_labels is not None else None
    sharded = isinstance(getattr(loader, "batch_sampler", None), distributed.ShardedBatches)
    order = [i for batch in loader.batch_sampler for i in batch] if sharded and real_labels is not None else None
    metrics, ens_metrics, real = ClassificationMetrics(), EnsembleMetrics(), _RealAccuracy(real_labels, order)
    seconds, images, overlap, error = 0.0, 0, 0, None
    name = getattr(model, "posthoc_name", None) or cfg_name(model)
    try:
        for batch in progress(loader, description=description, enabled=show_progress):
            x, y = batch[0], batch[1]
            if tuned is not None and len(batch) > 2:
                overlap += sum(int(d) in tuned for d in batch[2].tolist())
            x = x.to(device, dtype=dtype, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, amp), model_errors(name, x):
                probs, member_probs = predict(model, x, members=True)
            synchronize(device)
            seconds += time.perf_counter() - start
            images += x.shape[0]
            if valid is not None:
                probs = _restrict(probs, valid)
                member_probs = None if member_probs is None else _restrict(member_probs, valid)
            metrics.update(probs, y)
            real.update(probs)
            if member_probs is not None:
                ens_metrics.update(member_probs, y)
    except PosthocError as e:  # e.g. an unreadable image in one process's share: every process stops with it
        error = e
    throughput = images / max(seconds, 1e-9)
    if sharded:  # each process evaluated a block of batches: sum them in batch order, add up the speeds
        distributed.raise_any(error)
        metrics.reduce()
        ens_metrics.reduce()
        real.reduce()
        images, throughput = int(distributed.sum_across(images)), distributed.sum_across(throughput)
        overlap = int(distributed.sum_across(overlap))
    elif error is not None:
        raise error
    if images == 0:
        raise PosthocError("the evaluation data is empty; check --data, --split and --subset")
    m = metrics.compute()
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    result: dict[str, Any] = {
        "model": getattr(model, "posthoc_name", None) or cfg.get("architecture", type(model).__name__),
        "top1": round(m["top1"], 4),
        "top1_err": round(100 - m["top1"], 4),
        "top5": round(m["top5"], 4),
        "top5_err": round(100 - m["top5"], 4),
        "param_count": round(_num_parameters(model) / 1e6, 2),
        "img_size": data_config["input_size"][-1] if data_config else None,
        "crop_pct": data_config.get("crop_pct") if data_config else None,
        "interpolation": data_config.get("interpolation") if data_config else None,
        "nll": round(m["nll"], 5),
        "ece": round(m["ece"], 4),
        "brier": round(m["brier"], 5),
        "throughput": round(throughput, 2),
        "images": images,
    }
    if tuned is not None:
        result["tuned_images"] = overlap
    if real_labels is not None:
        top1, top5, counted = real.compute()
        result.update(
            top1_original=result["top1"],
            top1=round(top1, 4),
            top1_err=round(100 - top1, 4),
            top5=round(top5, 4),
            top5_err=round(100 - top5, 4),
            real_images=counted,
        )
    if is_ensemble(model):
        result["members"] = int(model.num_members)
        result.update({k: round(v, 4) for k, v in ens_metrics.compute().items()})
    result["reliability"] = metrics.reliability()
    return result


def cfg_name(model: nn.Module) -> str:
    """What a model is called in results: its timm architecture, or its class."""
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    return cfg.get("architecture") or type(model).__name__


def _restrict(probs: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Probabilities over the ``valid`` classes only, renormalised: ``p(y | y in valid)``."""
    sub = probs.index_select(-1, valid.to(probs.device))
    return sub / sub.sum(-1, keepdim=True).clamp_min(1e-12)


class _RealAccuracy:
    """ReaL top-1 / top-5: a prediction is correct when it is in the image's label set; images with an empty
    set are not counted (Beyer et al. 2020, as timm's ``RealLabelsImagenet``)."""

    def __init__(self, labels: Sequence[Sequence[int]] | None, order: Sequence[int] | None = None):
        """``order``: the images this process evaluates, as positions in the split (default: all, in order)."""
        self.labels, self.order = labels, order
        self.position, self.hits1, self.hits5, self.counted = 0, 0, 0, 0

    def update(self, probs: torch.Tensor) -> None:
        if self.labels is None:
            return
        top5 = probs.topk(min(5, probs.shape[-1]), dim=-1).indices.cpu().tolist()
        for row in top5:
            index = self.position if self.order is None else self.order[self.position]
            truth = set(self.labels[index])
            self.position += 1
            if truth:
                self.counted += 1
                self.hits1 += row[0] in truth
                self.hits5 += any(c in truth for c in row)

    def reduce(self) -> None:
        """Add up every process's counts (a no-op with one process)."""
        if self.labels is not None:
            parts = distributed.all_gather((self.position, self.hits1, self.hits5, self.counted))
            self.position, self.hits1, self.hits5, self.counted = (sum(p[i] for p in parts) for i in range(4))

    def compute(self) -> tuple[float, float, int]:
        if self.position != len(self.labels):
            raise PosthocError(
                f"--real-labels has {len(self.labels)} entries but {self.position} images were evaluated; "
                "use the labels of exactly this split"
            )
        n = max(self.counted, 1)
        return 100.0 * self.hits1 / n, 100.0 * self.hits5 / n, self.counted


HEADLINE = ("top1", "top5", "nll", "ece", "brier", "member_top1", "disagreement")


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of an :func:`evaluate` result that artifacts record (no throughput, no bins)."""
    return {k: result[k] for k in HEADLINE if k in result}


def _num_parameters(model: nn.Module) -> int:
    counter = getattr(model, "num_parameters", None)
    return counter() if callable(counter) else sum(p.numel() for p in model.parameters())
