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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import data as data_mod
from . import distributed
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
    channels_last: bool | None = None,
    compile: bool = False,
    subset: int | None = None,
    select_size: int | None = None,
    preprocessing: dict[str, Any] | None = None,
    class_map: str | Path | None = None,
    valid_labels: str | Path | None = None,
    real_labels: str | Path | None = None,
    skip_bad_images: bool = False,
    source: data_mod.Source | None = None,
    show_progress: bool = True,
    warn: Callable[[str], None] = lambda message: None,
) -> dict[str, Any]:
    """Evaluate the model or artifact ``spec`` on ``data``'s ``split`` (``val``, ``val:select``, ``val:report``).

    Preprocessing is the model's (timm's ``resolve_data_config``) with ``preprocessing`` overrides.
    For an artifact, the select / report parts are cut with the select size it was tuned with unless
    ``select_size`` is given, and ``warn`` gets one line when the evaluated images include images it
    was tuned on. ``valid_labels`` and ``real_labels`` are files as timm's ``validate.py`` takes them
    (see :func:`evaluate`); ``source`` reuses an already indexed split (several models, one scan).
    Returns :func:`evaluate`'s result with ``model`` and ``split`` set.
    """
    check_eval_options(
        batch_size=batch_size,
        workers=workers,
        subset=subset,
        select_size=select_size,
        preprocessing=preprocessing,
        device=device,
        dtype=dtype,
        valid_labels=valid_labels,
        real_labels=real_labels,
        skip_bad_images=skip_bad_images,
    )
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    part = data_mod.SplitSpec.parse(split)
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
    valid = read_valid_labels(valid_labels) if valid_labels is not None else None
    dataset = data_mod.open_split(
        source or data,
        part,
        data_mod.eval_transform(data_config),
        label_names=None if valid is not None else net.pretrained_cfg.get("label_names"),
        class_map=class_map,
        select_size=select_size,
        subset=subset,
        skip_bad=skip_bad_images,
    )
    real = read_real_labels(real_labels, dataset) if real_labels is not None else None
    loader = data_mod.make_loader(dataset, batch_size, workers=workers, shard="batches")
    module = torch.compile(net) if compile else net
    for attr in ("num_classes", "pretrained_cfg", "posthoc_name", "returns_probabilities", "num_members", "num_parameters"):
        if hasattr(net, attr) and module is not net:
            setattr(module, attr, getattr(net, attr))
    result = evaluate(
        module,
        loader,
        device=dev,
        dtype=dt,
        amp=amp,
        channels_last=channels_last,
        data_config=data_config,
        valid_labels=valid,
        real_labels=real,
        show_progress=show_progress,
    )
    result["model"] = spec
    result["split"] = str(part)
    if skip_bad_images:
        result["skipped_images"] = int(distributed.sum_across(data_mod.skipped_images()))
    return result


def evaluate_specs(
    specs: Sequence[str],
    data: str | Path,
    split: str = "val",
    *,
    results_file: str | Path | None = None,
    sort: str | None = None,
    on_result: Callable[[dict[str, Any]], None] = lambda row: None,
    **options: Any,
) -> list[dict[str, Any]]:
    """Evaluate several models, one row each; a model that fails gets a row with its ``error`` and the rest
    go on. Rows are written to ``results_file`` as each finishes (so a killed run keeps the finished ones)
    and, at the end, sorted by ``sort`` (a result field, descending; e.g. ``top1``)."""
    check_results_file(results_file)
    check_eval_options(**options)
    part = data_mod.SplitSpec.parse(split)
    source = data_mod.open_source(data, part.split)  # one scan of the split for every model
    rows: list[dict[str, Any]] = []
    for spec in specs:
        try:
            row = evaluate_spec(spec, data, split, source=source, **options)
        except PosthocError as e:
            row = {"model": spec, "split": str(part), "error": str(e)}
        rows.append(row)
        on_result(row)
        if results_file is not None:
            write_results(rows, results_file)
    if sort is not None:
        rows.sort(key=lambda r: (r.get(sort) is None, -(r.get(sort) or 0)))
        if results_file is not None:
            write_results(rows, results_file)
    return rows


def speed_paths(device: str = "auto", *, amp: bool = False, channels_last: bool | None = None, compile: bool = False) -> str:
    """One line saying which speed paths an evaluation uses. On CUDA, cuDNN's autotuner is switched on here
    (inputs of one size throughout); channels-last defaults to on there. On CPU nothing changes unless asked."""
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
    on = {
        "channels-last": cuda if channels_last is None else channels_last,
        f"AMP ({'float16' if cuda else 'bfloat16'})": amp,
        "torch.compile": compile,
        "cudnn.benchmark": cuda,
        "pinned memory": cuda,
    }
    used = [k for k, v in on.items() if v]
    return f"device {dev}; speed paths: {', '.join(used) if used else 'none (CPU defaults)'}"


def check_eval_options(
    *,
    batch_size=None,
    workers=None,
    subset=None,
    select_size=None,
    preprocessing=None,
    device="auto",
    dtype="float32",
    valid_labels=None,
    real_labels=None,
    skip_bad_images=False,
    **_unchecked: Any,
) -> None:
    """Every evaluation option checked at once, before any model is loaded (one line for the first problem).

    Takes the whole option set of :func:`evaluate_spec`; options with nothing to check are ignored."""
    data_mod.check_loader_options(batch_size, workers, subset, select_size)
    data_mod.check_preprocessing(preprocessing)
    resolve_device(device)
    resolve_dtype(dtype)
    for flag, path in (("--valid-labels", valid_labels), ("--real-labels", real_labels)):
        if path is not None and not Path(path).is_file():
            raise PosthocError(f"{flag} file {path} does not exist; check the path")
    if valid_labels is not None and real_labels is not None:
        raise PosthocError("--real-labels index the model's full label space and --valid-labels a subset of it; give one of them")
    if real_labels is not None and (skip_bad_images or subset is not None):
        raise PosthocError("--real-labels align with every image of the split in order; drop --skip-bad-images and --subset")


def read_valid_labels(path: str | Path) -> list[int]:
    """Class indices, one per line (timm's ``--valid-labels`` format, e.g. ImageNet-A's 200 of 1000)."""
    try:
        labels = [int(line.split()[0]) for line in Path(path).read_text().splitlines() if line.strip()]
    except ValueError:
        raise PosthocError(f"--valid-labels {path} must hold one class index per line") from None
    if not labels or len(set(labels)) != len(labels):
        raise PosthocError(f"--valid-labels {path} must list each class index once")
    return labels


def read_real_labels(path: str | Path, dataset) -> list[list[int]]:
    """The ImageNet-ReaL label sets (``real.json``: a list, entry ``i`` for ``ILSVRC2012_val_{i+1:08d}.JPEG``)
    of the images of ``dataset`` in its order."""
    import re

    try:
        table = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PosthocError(f"--real-labels {path} is not valid JSON ({e})") from None
    if not isinstance(table, list):
        raise PosthocError(f"--real-labels {path} must be a JSON list of label lists (ImageNet-ReaL's real.json)")
    samples = dataset.dataset.samples if hasattr(dataset, "indices") else dataset.samples
    order = dataset.indices if hasattr(dataset, "indices") else range(len(samples))
    out = []
    for i in order:
        name = Path(samples[i][0]).name
        match = re.fullmatch(r"ILSVRC2012_val_(\d{8})\.\w+", name)
        if match is None or not 0 < int(match.group(1)) <= len(table):
            raise PosthocError(
                f"--real-labels maps ImageNet validation file names (ILSVRC2012_val_NNNNNNNN.JPEG); '{name}' is not one"
            )
        out.append(list(table[int(match.group(1)) - 1]))
    return out


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
    channels_last: bool | None = None,
    data_config: dict[str, Any] | None = None,
    valid_labels: Sequence[int] | None = None,
    real_labels: Sequence[Sequence[int]] | None = None,
    show_progress: bool = True,
    description: str = "eval",
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
    :func:`evaluate_spec` makes under torchrun) is evaluated in parallel: the per-batch sums of every
    process are added in batch order, so every metric equals the single-process one exactly;
    ``throughput`` is the sum of the processes' and an error on one process is raised on all.
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
    if model_classes and expected != data_classes:
        what = (
            f"--valid-labels lists {expected} classes" if valid_labels is not None else f"the model predicts {expected} classes"
        )
        raise PosthocError(
            f"{what} but the data has {data_classes} classes; evaluate on data of the model's label space, or map the "
            "data's classes onto the model's with --class-map FILE (or --valid-labels FILE for a subset of them)"
        )
    valid = torch.as_tensor(list(valid_labels), dtype=torch.long) if valid_labels is not None else None
    sharded = isinstance(getattr(loader, "batch_sampler", None), distributed.ShardedBatches)
    order = [i for batch in loader.batch_sampler for i in batch] if sharded and real_labels is not None else None
    metrics, ens_metrics, real = ClassificationMetrics(), EnsembleMetrics(), _RealAccuracy(real_labels, order)
    seconds, images, error = 0.0, 0, None
    try:
        for x, y in progress(loader, description=description, enabled=show_progress):
            x = x.to(device, dtype=dtype, non_blocking=True)
            if channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            synchronize(device)
            start = time.perf_counter()
            with autocast(device, amp):
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
    fields, one row per model), atomically. Missing or undefined values are ``null`` / empty, never ``NaN``.
    With several processes only rank 0 writes."""
    if not distributed.is_main():  # with several processes, rank 0 writes
        return
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
