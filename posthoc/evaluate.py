"""Scripted evaluation of a model or an ensemble artifact on an ImageFolder split.

The result fields follow timm's ``validate.py`` (``model``, ``top1``, ``top1_err``, ``top5``,
``top5_err``, ``param_count`` in millions, ``img_size``, ``crop_pct``, ``interpolation``), plus
``nll``, ``ece`` (%), ``brier`` and ``throughput``. ``throughput`` is images per second of the model's
forward passes alone (the clock stops around each batch's forward, synchronised on CUDA), so it does
not depend on how fast the disk decodes JPEGs. For an ensemble, ``members``, ``member_top1`` and
``disagreement`` (%) are added.
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import PosthocError
from .metrics import ClassificationMetrics, EnsembleMetrics
from .runtime import autocast, progress, synchronize


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
    data_config: dict[str, Any] | None = None,
    show_progress: bool = True,
    description: str = "eval",
) -> dict[str, Any]:
    """Run ``model`` over ``loader`` and return timm-style results plus calibration metrics.

    ``data_config`` (from :func:`posthoc.data.resolve_data_config`) fills ``img_size``, ``crop_pct``
    and ``interpolation`` as timm's ``validate.py`` reports them. ``reliability`` holds the
    per-bin confidence and accuracy behind the ECE.
    """
    model = model.to(device=device, dtype=dtype).eval()
    data_classes = len(loader.dataset.classes)
    model_classes = int(getattr(model, "num_classes", 0) or 0)
    if model_classes and model_classes != data_classes:
        raise PosthocError(
            f"the model predicts {model_classes} classes but the data has {data_classes} class folders; "
            f"pass --num-classes {data_classes} to re-head the model, or point --data at its label space"
        )
    metrics, ens_metrics = ClassificationMetrics(), EnsembleMetrics()
    seconds, images = 0.0, 0
    for x, y in progress(loader, description=description, enabled=show_progress):
        x = x.to(device, dtype=dtype, non_blocking=True)
        synchronize(device)
        start = time.perf_counter()
        with autocast(device, amp):
            probs, member_probs = predict(model, x, members=True)
        synchronize(device)
        seconds += time.perf_counter() - start
        images += x.shape[0]
        metrics.update(probs, y)
        if member_probs is not None:
            ens_metrics.update(member_probs, y)
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
        "throughput": round(images / max(seconds, 1e-9), 2),
        "images": images,
    }
    if is_ensemble(model):
        result["members"] = int(model.num_members)
        result.update({k: round(v, 4) for k, v in ens_metrics.compute().items()})
    result["reliability"] = metrics.reliability()
    return result


def _num_parameters(model: nn.Module) -> int:
    counter = getattr(model, "num_parameters", None)
    return counter() if callable(counter) else sum(p.numel() for p in model.parameters())


def write_results(result: dict[str, Any], path: str | Path) -> None:
    """Write one result to ``.json`` (all fields) or ``.csv`` (scalar fields, one row with header)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix.lower() == ".csv":
        row = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
    elif path.suffix.lower() == ".json":
        tmp.write_text(json.dumps(result, indent=2) + "\n")
    else:
        raise PosthocError(f"--results-file must end in .json or .csv, got '{path.name}'")
    os.replace(tmp, path)  # never a half-written results file
