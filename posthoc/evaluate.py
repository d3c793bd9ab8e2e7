"""Scripted evaluation of a model or an ensemble artifact on an ImageFolder split.

:func:`evaluate_spec` is the whole ``posthoc eval`` pipeline (load the spec, resolve preprocessing,
read the split, evaluate, warn when the images overlap what an artifact was tuned on);
:func:`evaluate` runs any module over any loader.

The result fields follow timm's ``validate.py`` (``model``, ``top1``, ``top1_err``, ``top5``,
``top5_err``, ``param_count`` in millions, ``img_size``, ``crop_pct``, ``interpolation``), plus
``nll``, ``ece`` (%), ``brier`` and ``throughput``. ``throughput`` is images per second of the model's
forward passes alone (the clock stops around each batch's forward, synchronised on CUDA), so it does
not depend on how fast the disk decodes JPEGs. For an ensemble, ``members``, ``member_top1`` and
``disagreement`` (%) are added.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from .errors import PosthocError
from .metrics import ClassificationMetrics, EnsembleMetrics
from .paths import ensure_writable, write_text_atomically
from .runtime import autocast, progress, resolve_device, resolve_dtype, synchronize
from .sources import load_model

RESULT_SUFFIXES = (".json", ".csv")


def evaluate_spec(
    spec: str,
    data: str | Path,
    split: str = "val",
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    batch_size: int = 256,
    workers: int | None = None,
    device: str = "auto",
    dtype: str = "float32",
    amp: bool = False,
    subset: int | None = None,
    select_size: int | None = None,
    preprocessing: dict[str, Any] | None = None,
    class_map: str | Path | None = None,
    skip_bad_images: bool = False,
    show_progress: bool = True,
    warn: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate the model or artifact ``spec`` on ``data``'s ``split`` (``val``, ``val:select``, ``val:report``).

    Preprocessing is the model's (timm's ``resolve_data_config``) with ``preprocessing`` overrides.
    For an artifact, the select / report parts are cut with the select size it was tuned with unless
    ``select_size`` is given, and ``warn`` gets one line when the evaluated images include images it
    was tuned on. Returns :func:`evaluate`'s result with ``model`` and ``split`` set.
    """
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    part = data_mod.SplitSpec.parse(split)
    data_mod.check_loader_options(batch_size, workers, subset, select_size)
    data_mod.check_preprocessing(preprocessing)
    net = load_model(spec, arch=arch, warn=warn)
    if num_classes is not None and num_classes != net.num_classes:
        raise PosthocError(
            f"--num-classes {num_classes} would give {spec} a new, untrained classifier, and evaluation would score chance; "
            f"evaluate on data of its {net.num_classes} classes (re-heading only makes sense before training)"
        )
    select_size, warning = tuned_on_overlap(getattr(net, "posthoc_config", {}), part, select_size)
    if warning:
        warn(warning)
    data_config = data_mod.resolve_data_config(net, preprocessing)
    dataset = data_mod.open_split(
        data,
        part,
        data_mod.eval_transform(data_config),
        label_names=net.pretrained_cfg.get("label_names"),
        class_map=class_map,
        select_size=select_size,
        subset=subset,
        skip_bad=skip_bad_images,
    )
    loader = data_mod.make_loader(dataset, batch_size, workers=workers)
    result = evaluate(net, loader, device=dev, dtype=dt, amp=amp, data_config=data_config, show_progress=show_progress)
    result["model"] = spec
    result["split"] = str(part)
    if skip_bad_images:
        result["skipped_images"] = data_mod.skipped_images()
    return result


def tuned_on_overlap(config: dict[str, Any], part: data_mod.SplitSpec, select_size: int | None) -> tuple[int | None, str | None]:
    """The select size to cut ``part`` with, and a warning when ``part`` overlaps what the artifact
    (``config``, its ``config.json``) was tuned on.

    Artifacts record the split part and select size they tuned on: the same select size is used by
    default, so ``val:report`` holds none of the tuned images.
    """
    recorded_data = (config or {}).get("data", {})
    tuned = recorded_data.get("tuned_on")
    if not tuned:
        return select_size, None
    t_split, _, t_part = tuned.partition(":")
    if t_split != part.split:
        return select_size, None
    recorded = recorded_data.get("select_size")
    if select_size is None:
        select_size = recorded
    where = f"this artifact was tuned on '{tuned}' ({recorded} images)"
    if part.part is None or not t_part:
        return select_size, f"{where}, which is part of '{part}'; figures on it are optimistic. Report on '{t_split}:report'."
    if part.part == t_part:
        return select_size, f"{where}; figures on the same images are optimistic. Report on '{t_split}:report'."
    if part.part == "report" and recorded is not None and select_size < recorded:
        return select_size, (
            f"{where}; with --select-size {select_size} '{part}' includes {recorded - select_size} of them, "
            f"so figures are optimistic. Drop --select-size to use the recorded {recorded}."
        )
    return select_size, None


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
            f"the model predicts {model_classes} classes but the data has {data_classes} classes; evaluate on data of "
            "the model's label space, or map the data's classes onto the model's with --class-map FILE"
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


HEADLINE = ("top1", "top5", "nll", "ece", "brier", "member_top1", "disagreement")


def headline(result: dict[str, Any]) -> dict[str, float]:
    """The scalar metrics of an :func:`evaluate` result that artifacts record (no throughput, no bins)."""
    return {k: result[k] for k in HEADLINE if k in result}


def _num_parameters(model: nn.Module) -> int:
    counter = getattr(model, "num_parameters", None)
    return counter() if callable(counter) else sum(p.numel() for p in model.parameters())


def check_results_file(path: str | Path | None) -> None:
    """Before any work: the results file ends in .json or .csv and can be written."""
    if path is None:
        return
    path = Path(path)
    if path.suffix.lower() not in RESULT_SUFFIXES:
        raise PosthocError(f"--results-file must end in {' or '.join(RESULT_SUFFIXES)}, got '{path.name}'")
    ensure_writable(path, "results file")


def write_results(results: dict[str, Any] | list[dict[str, Any]], path: str | Path) -> None:
    """Write results to ``.json`` (all fields; one object, or a list for several models) or ``.csv`` (scalar
    fields, one row per model), atomically. Missing or undefined values are ``null`` / empty, never ``NaN``."""
    path = Path(path)
    rows = results if isinstance(results, list) else [results]
    check_results_file(path)
    if path.suffix.lower() == ".csv":
        scalars = [{k: v for k, v in r.items() if not isinstance(v, (list, dict))} for r in rows]
        fields = list(dict.fromkeys(k for r in scalars for k in r))
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=fields)
        writer.writeheader()
        writer.writerows(scalars)
        text = buffer.getvalue()
    else:
        text = json.dumps(_json_safe(results), indent=2, allow_nan=False) + "\n"
    write_text_atomically(path, text, "results file")


def _json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value
