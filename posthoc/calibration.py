"""The last step of every artifact: its test-time views and its temperature, chosen on the select part.

One pass over the select part with every candidate view gives each member's logits under each view; the
candidates are then scored without touching the images again:

- **Views** (``--tta``): ``none`` (the image alone), ``flip`` (the image and its mirror), or ``auto``: the
  mirror is kept only where it lowers the two-fold cross-validated NLL of the select part (each half scored
  with the temperature fitted on the other half, as the temperature rule decides), so a dataset whose
  classes are not mirror-symmetric ends with the image alone. Under an inference budget, views and members
  share it: a candidate with the mirror keeps the first members that fit the budget twice over (so at 2x,
  one network seeing two views competes with two networks seeing one), and the lower cross-validated NLL
  wins. The FLOPs of each candidate are counted as the artifact would run (V views = V passes through the
  member-specific part).
- **Temperature** (:mod:`posthoc.temperature`), fitted after the views on the whole select part: kept only
  where it lowers the cross-validated NLL (``boost``'s rule, ``"cv"``), always (``posthoc calibrate``,
  ``"always"``), or not fitted (``"off"``, and for hard votes).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from .cost import fits, flops_ratio
from .ensemble import Combine, Ensemble
from .errors import PosthocError
from .fused import EnsembleModule
from .temperature import cross_validated_nll, select_nll, temperature_fit
from .training import cache_outputs
from .views import IDENTITY, TTA_SETS, describe, views_of

TEMPERATURE_MODES = ("cv", "always", "off")


@torch.no_grad()
def view_logits(
    module: EnsembleModule, loader: Iterable, device: torch.device, views: tuple[str, ...]
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pre-temperature logits of every member under every view over ``loader``: ``(members, coupled, y)``
    with ``members`` (K, V, N, C) and, for a coupling ensemble, ``coupled`` (V, N, C)."""
    module = module.to(device).eval()
    coupling = module.coupling is not None
    saved, module.views = module.views, views
    try:

        def outputs(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
            combined, members = module.raw_logits(x)
            batch_first = (members.permute(2, 0, 1, 3),)
            return (*batch_first, combined.permute(1, 0, 2)) if coupling else batch_first

        (cached,), y = cache_outputs([outputs], loader, device)
    finally:
        module.views = saved
    members = cached[0].permute(1, 2, 0, 3)
    return members, (cached[1].permute(1, 0, 2) if coupling else None), y


def first_members(ensemble: Ensemble, k: int) -> Ensemble:
    """The ensemble of its first ``k`` members (in member order: the parent first where it is one)."""
    if k >= ensemble.num_members:
        return ensemble
    if ensemble.combine.rule == "coupling":
        raise PosthocError("a coupling layer combines every member; its members cannot be dropped")
    groups, left = [], k
    for g in ensemble.groups:
        if left <= 0:
            break
        n = min(left, g.num_members)
        members = {name: t[:n] for name, t in g.member_tensors.items()}
        groups.append(dataclasses.replace(g, member_names=g.member_names[:n], member_tensors=members))
        left -= n
    return Ensemble(groups=groups, combine=ensemble.combine)


@dataclasses.dataclass
class Candidate:
    """A way to spend the inference budget: the first ``members`` members, each seeing ``views``."""

    members: int
    views: tuple[str, ...]
    flops_ratio: float | None = None
    cv_nll: float | None = None

    def label(self) -> str:
        return f"{self.members} member(s) x {len(self.views)} view(s)"


def finish(
    ensemble: Ensemble,
    loader: Iterable,
    device: torch.device,
    *,
    tta: str = "auto",
    temperature: str = "cv",
    budget: float | None = None,
    parent: nn.Module | None = None,
    log: Callable[[str], None] = lambda message: None,
) -> tuple[Ensemble, dict[str, Any]]:
    """``ensemble`` with its views and temperature chosen on ``loader`` (the select part), and the record.

    ``tta``: ``auto``, ``none`` or ``flip``; ``temperature``: ``cv``, ``always`` or ``off`` (see the module
    docstring); ``budget`` (FLOPs per image in parent passes, ``parent`` the model they are counted against)
    makes the mirrored candidate keep only the members that fit. Returns the chosen ensemble and
    ``{"views": ..., "temperature": ...}`` (the temperature record is ``None`` when none was fitted).
    """
    module = EnsembleModule(ensemble.as_float32())
    chosen, t, record = choose(
        module, loader, device, _candidates(ensemble, tta, budget, parent), temperature=temperature, log=log
    )
    record["views"]["tta"] = tta
    result = first_members(ensemble, chosen.members)
    combine = dataclasses.replace(
        result.combine, views=chosen.views, temperature=t if t is not None else result.combine.temperature
    )
    return Ensemble(groups=result.groups, combine=combine), record


def choose(
    module: EnsembleModule,
    loader: Iterable,
    device: torch.device,
    candidates: list[Candidate],
    *,
    temperature: str = "cv",
    log: Callable[[str], None] = lambda message: None,
) -> tuple[Candidate, float | None, dict[str, Any]]:
    """The candidate with the lowest cross-validated select NLL (the first, the image alone, unless another is
    strictly lower), the temperature fitted for it (``None`` with ``temperature="off"``), and the record; one
    pass over ``loader`` with every candidate view."""
    all_views = max((c.views for c in candidates), key=len)
    members, coupled, y = view_logits(module, loader, device, all_views)
    chosen, logits = score_candidates(candidates, all_views, members, coupled, y, module.rule, temperature)
    if len(candidates) > 1:
        others = ", ".join(f"{c.label()} {c.cv_nll:.4f}" for c in candidates if c is not chosen)
        log(
            f"views: {describe(chosen.views)} with {chosen.members} member(s), cross-validated select NLL {chosen.cv_nll:.4f} (against {others})"
        )
    t, fit = None, None
    if temperature != "off" and module.rule != "vote":
        t, fit = temperature_fit(logits, y, module.rule, only_if_it_helps=temperature == "cv")
    record = {
        "candidates": [dataclasses.asdict(c) | {"views": list(c.views)} for c in candidates],
        "chosen": {"members": chosen.members, "views": list(chosen.views)},
    }
    return chosen, t, {"views": record, "temperature": fit}


def score_candidates(
    candidates: list[Candidate],
    all_views: tuple[str, ...],
    members: torch.Tensor,
    coupled: torch.Tensor | None,
    y: torch.Tensor,
    rule: str,
    temperature: str = "cv",
) -> tuple[Candidate, torch.Tensor]:
    """Score every candidate by the NLL of the select part held out from what is fitted on it (``cv_nll``) and
    return the winner with its pre-temperature logits. ``members`` (K, V, N, C) and ``coupled`` (V, N, C) hold
    every view of ``all_views``. With ``temperature`` ``cv`` a candidate scores the better of with and without
    a temperature fitted on the other half (boost keeps it only where it helps), ``always`` with it, ``off``
    (and hard votes) without. The first candidate (the image alone) is kept unless another is strictly lower."""
    if temperature not in TEMPERATURE_MODES:
        raise ValueError(f"temperature must be one of {TEMPERATURE_MODES}")
    if rule == "vote":
        temperature = "off"

    def logits_of(c: Candidate) -> torch.Tensor:
        index = [all_views.index(v) for v in c.views]
        return coupled[index] if coupled is not None else members[: c.members, index].flatten(0, 1)

    for c in candidates:
        if temperature == "off":
            c.cv_nll = round(select_nll(logits_of(c), y, rule), 5)  # nothing is fitted: nothing to hold out
            continue
        with_t, without = cross_validated_nll(logits_of(c), y, rule)
        c.cv_nll = round(min(with_t, without) if temperature == "cv" else with_t, 5)
    chosen = candidates[0]
    for c in candidates[1:]:
        if c.cv_nll < chosen.cv_nll:
            chosen = c
    return chosen, logits_of(chosen)


def candidates_for(module: EnsembleModule, tta: str) -> list[Candidate]:
    """The view sets ``tta`` (``auto``, ``none``, ``flip``) allows for every member of ``module``, the image alone first."""
    return [
        Candidate(module.num_members, views) for views in ([IDENTITY, TTA_SETS["flip"]] if tta == "auto" else [views_of(tta)])
    ]


def _candidates(ensemble: Ensemble, tta: str, budget: float | None, parent: nn.Module | None) -> list[Candidate]:
    """The view sets (and member counts) ``tta`` allows, the image alone first; under a budget the mirrored
    candidate keeps the first members whose FLOPs fit it."""
    k = ensemble.num_members
    wanted = [IDENTITY, TTA_SETS["flip"]] if tta == "auto" else [views_of(tta)]
    out = []
    for views in wanted:
        if budget is None or parent is None or views == IDENTITY:
            out.append(Candidate(k, views))
            continue
        counts = [k] if ensemble.combine.rule == "coupling" else range(k, 0, -1)
        for n in counts:
            subset = first_members(ensemble, n)
            module = EnsembleModule(
                dataclasses.replace(subset, combine=dataclasses.replace(subset.combine, views=views)).as_float32()
            )
            ratio = flops_ratio(module.to(next(parent.parameters()).device), parent)
            if fits(ratio, budget):
                out.append(Candidate(n, views, flops_ratio=round(ratio, 4)))
                break
    if not out:
        raise PosthocError(f"no member fits --inference-budget {budget:g} with --tta {tta}; raise the budget or use --tta none")
    return out


def with_views(model: nn.Module, views: tuple[str, ...], name: str | None = None) -> EnsembleModule:
    """``model`` run with ``views``: an artifact's module with its views replaced (in place), or a checkpoint as a
    one-member artifact module (so ``posthoc eval --tta flip`` scores any timm model with its mirror)."""
    if isinstance(model, EnsembleModule):
        model.views = views
        return model
    module = EnsembleModule(Ensemble.from_models([model], [name or "model"], Combine(views=views))).to(
        next(model.parameters()).device
    )
    module.posthoc_name = name
    return module.eval()
