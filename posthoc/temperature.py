"""Temperature scaling: one temperature T dividing every member's logits (the coupled logits for a
SuperNet) before the combine rule, fitted on the select part by minimising the NLL of the ensemble's own
prediction (Guo et al. 2017, applied to the combined output; :func:`posthoc.metrics.fit_temperature`).

It is stored in the artifact's combine rule, so ``posthoc.load`` applies it. :func:`calibrated` is the
step every artifact goes through (``boost``'s last step, ``posthoc calibrate``, a distilled student); it
records the two-fold cross-validated NLL of the select part with and without the temperature, which
decides whether ``boost`` keeps it. Hard votes have no temperature.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

import torch

from .ensemble import Ensemble, combine_probabilities
from .errors import PosthocError
from .fused import EnsembleModule
from .metrics import ClassificationMetrics, fit_temperature
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
    """``ensemble`` with a temperature fitted on ``loader`` (the select part), and what the fit measured
    (:func:`temperature_fit`)."""
    logits, y = select_logits(EnsembleModule(ensemble.as_float32()), loader, device)
    t, fit = temperature_fit(logits, y, ensemble.combine.rule, only_if_it_helps=only_if_it_helps)
    return Ensemble(groups=ensemble.groups, combine=dataclasses.replace(ensemble.combine, temperature=t)), fit


def temperature_fit(
    logits: torch.Tensor, y: torch.Tensor, rule: str, *, only_if_it_helps: bool = False
) -> tuple[float, dict[str, Any]]:
    """The temperature for pre-temperature ``logits`` (what the rule combines, (K, N, C)) and the record of the fit.

    The fit starts from the raw logits, so re-calibrating gives the same temperature whatever the old one.
    ``cross_validated`` records the NLL of two-fold cross-validation on the select part (fit the
    temperature on one half, score the other) against no temperature; with ``only_if_it_helps`` (boost's
    default step) the temperature is kept at 1 unless it lowers that held-out NLL, since a temperature
    fitted on a few hundred images of an accurate model can hurt the next images.
    """
    t, before, after = fit_ensemble_temperature(logits, y, rule)
    fitted, unscaled = cross_validated_nll(logits, y, rule)
    fit = {
        "temperature": round(t, 6),
        "select_before": before,
        "select_after": after,
        "cross_validated": {"nll_with_temperature": round(fitted, 5), "nll_without": round(unscaled, 5)},
    }
    if only_if_it_helps and not fitted < unscaled:
        return 1.0, {**fit, "temperature": 1.0, "select_after": before, "applied": False}
    return t, {**fit, "applied": True}


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


def _scores(logits: torch.Tensor, y: torch.Tensor, rule: str, temperature: float) -> dict[str, float]:
    m = ClassificationMetrics()
    m.update(combine_probabilities(logits.double(), rule, temperature), y)
    r = m.compute()
    return {k: round(r[k], 5) for k in ("top1", "nll", "ece")}


def select_nll(logits: torch.Tensor, y: torch.Tensor, rule: str, temperature: float = 1.0) -> float:
    """The NLL of the combined prediction of pre-temperature ``logits`` (K, N, C) at ``temperature``."""
    return _scores(logits, y, rule, temperature)["nll"]
