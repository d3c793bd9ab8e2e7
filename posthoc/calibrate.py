"""Temperature scaling for every artifact: the final step of ``boost`` and the ``posthoc calibrate`` command.

One temperature T divides every member's logits (the coupled logits for a SuperNet) before the combine
rule, and is fitted on the select part by minimising the NLL of the ensemble's own prediction (Guo et
al. 2017, applied to the combined output; :func:`posthoc.metrics.fit_temperature`). It is stored in the
artifact's combine rule, so ``posthoc.load`` applies it. Hard votes have no temperature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from . import data as data_mod
from .artifact import check_output, read, save
from .ensemble import Ensemble, Provenance, combine_probabilities
from .errors import PosthocError
from .fused import EnsembleModule
from .metrics import ClassificationMetrics, fit_temperature
from .runtime import resolve_device
from .sources import artifact_dir, is_artifact, load_model, member_name, storage_dtype
from .training import cache_outputs


@torch.no_grad()
def select_logits(module: EnsembleModule, loader: Iterable, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits an ensemble's combine rule starts from (before its temperature) over ``loader``, (K, N, C),
    and the targets."""
    module = module.to(device).eval()
    (outputs,), y = cache_outputs([lambda x: (module.raw_logits(x)[0].transpose(0, 1),)], loader, device)
    return outputs[0].transpose(0, 1), y


def fit_ensemble_temperature(
    logits: torch.Tensor, y: torch.Tensor, rule: str
) -> tuple[float, dict[str, float], dict[str, float]]:
    """The temperature of an ensemble with these pre-temperature ``logits`` (K, N, C) under ``rule``,
    and the NLL / top-1 / ECE before and after it."""
    if rule == "vote":
        raise PosthocError("a hard vote has no temperature to fit; use --combine prob_mean or --no-temperature-scaling")
    t = fit_temperature(logits, y, combine=lambda z: combine_probabilities(z, rule))
    return t, _scores(logits, y, rule, 1.0), _scores(logits, y, rule, t)


def calibrated(
    ensemble: Ensemble, loader: Iterable, device: torch.device, *, only_if_it_helps: bool = False
) -> tuple[Ensemble, dict[str, Any]]:
    """``ensemble`` with a temperature fitted on ``loader`` (the select part), and what the fit measured.

    The fit starts from the raw logits, so re-calibrating gives the same temperature whatever the old one.
    ``cross_validated`` records the NLL of two-fold cross-validation on the select part (fit the
    temperature on one half, score the other) against no temperature; with ``only_if_it_helps`` (boost's
    default step) the temperature is kept at 1 unless it lowers that held-out NLL, since a temperature
    fitted on a few hundred images of an accurate model can hurt the next images.
    """
    logits, y = select_logits(EnsembleModule(ensemble), loader, device)
    t, before, after = fit_ensemble_temperature(logits, y, ensemble.combine.rule)
    fitted, unscaled = cross_validated_nll(logits, y, ensemble.combine.rule)
    helps = fitted < unscaled
    fit = {
        "temperature": round(t, 6),
        "select_before": before,
        "select_after": after,
        "cross_validated": {"nll_with_temperature": round(fitted, 5), "nll_without": round(unscaled, 5)},
    }
    if only_if_it_helps and not helps:
        fit.update(temperature=1.0, select_after=before, applied=False)
        return ensemble, fit
    combine = dataclasses.replace(ensemble.combine, temperature=t)
    return Ensemble(groups=ensemble.groups, combine=combine), {**fit, "applied": True}


def cross_validated_nll(logits: torch.Tensor, y: torch.Tensor, rule: str) -> tuple[float, float]:
    """Two-fold cross-validated NLL of the select part with a fitted temperature, and without one.

    The folds are a fixed random halving (seed 0) of the images."""
    n = len(y)
    if n < 4:
        return float("inf"), 0.0
    order = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    folds = (order[: n // 2], order[n // 2 :])
    with_t, without = 0.0, 0.0
    for fit_on, score_on in (folds, folds[::-1]):
        t = fit_temperature(logits[:, fit_on], y[fit_on], combine=lambda z: combine_probabilities(z, rule))
        with_t += _scores(logits[:, score_on], y[score_on], rule, t)["nll"] * len(score_on)
        without += _scores(logits[:, score_on], y[score_on], rule, 1.0)["nll"] * len(score_on)
    return with_t / n, without / n


def calibrate(
    spec: str,
    data: str | Path,
    out: str | Path,
    *,
    val_split: str = "val",
    select_size: int | None = None,
    arch: str | None = None,
    device: str = "auto",
    workers: int | None = None,
    preprocessing: dict[str, Any] | None = None,
    overwrite: bool = False,
    class_map: str | Path | None = None,
    skip_bad_images: bool = False,
    command: str | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Write ``spec`` with a temperature fitted on ``data``'s select part as an artifact at ``out``.

    ``spec`` is a checkpoint (the result is a one-member artifact: the cheapest calibration there is) or
    an artifact (its temperature is re-fitted; its weights file stays bit-identical, and an artifact tuned
    on a select part is calibrated on that same part). Returns the temperature and the select-part
    metrics before and after.
    """
    out = Path(out)
    data_mod.check_loader_options(workers=workers, select_size=select_size)
    data_mod.check_preprocessing(preprocessing)
    check_output(out, overwrite)
    dev = resolve_device(device)
    if is_artifact(spec):
        source = artifact_dir(spec)
        ensemble, config = read(source)
        provenance = Provenance.from_config(config)
        tuned = provenance.data.get("tuned_on", "")
        if select_size is None and tuned.partition(":")[0] == data_mod.SplitSpec.parse(val_split).split:
            select_size = provenance.data.get("select_size")
        module = EnsembleModule(ensemble)
        pretrained_cfg = module.pretrained_cfg
        stored_dtype = None  # the artifact's tensors keep the dtypes they were read in
    else:
        model = load_model(spec, arch=arch)
        stored_dtype = storage_dtype([model])
        ensemble = Ensemble.from_models([model], [member_name(spec)])
        provenance = Provenance(method="calibrate", sources=[spec])
        pretrained_cfg = model.pretrained_cfg
        module = model
    data_config = data_mod.resolve_data_config(module, preprocessing)
    select_spec = data_mod.SplitSpec(data_mod.SplitSpec.parse(val_split).split, "select")
    dataset = data_mod.open_split(
        data,
        select_spec,
        data_mod.eval_transform(data_config),
        label_names=pretrained_cfg.get("label_names"),
        class_map=class_map,
        select_size=select_size,
        skip_bad=skip_bad_images,
    )
    if len(dataset.classes) != ensemble.num_classes:
        raise PosthocError(
            f"the model predicts {ensemble.num_classes} classes but {select_spec} has {len(dataset.classes)} class folders; "
            "point --data at its label space"
        )
    loader = data_mod.make_loader(dataset, 256, workers=workers)
    result, fit = calibrated(ensemble, loader, dev)
    log(
        f"temperature {fit['temperature']:.4g} on {len(dataset)} images of {select_spec}: NLL {fit['select_before']['nll']:.4f} -> "
        f"{fit['select_after']['nll']:.4f}, ECE {fit['select_before']['ece']:.2f}% -> {fit['select_after']['ece']:.2f}%"
    )
    measured = dict(provenance.measured)
    measured["calibration"] = {**fit, "command": command} if command else fit
    data_record = provenance.data or {"dataset": str(data), "tuned_on": str(select_spec), "select_size": len(dataset)}
    metrics = {**provenance.metrics, f"{select_spec} (calibrated)": fit["select_after"]}
    provenance = dataclasses.replace(
        provenance, measured=measured, data=data_record, metrics=metrics, command=provenance.command or command
    )
    save(result, out, provenance, overwrite=overwrite, dtype=stored_dtype)
    return {
        "out": str(out),
        "temperature": fit["temperature"],
        "before": fit["select_before"],
        "after": fit["select_after"],
        "images": len(dataset),
    }


def _scores(logits: torch.Tensor, y: torch.Tensor, rule: str, temperature: float) -> dict[str, float]:
    m = ClassificationMetrics()
    m.update(combine_probabilities(logits.double(), rule, temperature), y)
    r = m.compute()
    return {k: round(r[k], 5) for k in ("top1", "nll", "ece")}
