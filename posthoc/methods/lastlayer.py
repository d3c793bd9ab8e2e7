"""``lastlayer``: last-layers retraining of one network (Bukowski 2020, §3.1).

The network is frozen, its classifier retrained, then earlier layers one at a time, last first, each
with a fresh optimizer (cosine-annealed; SGD momentum 0.9 for a BatchNorm network, AdamW for any other)
on cached activations of the training images; each stage keeps its best epoch on the select part (epoch
0 included, so a stage that does not help changes nothing). The result is one network (a one-member
artifact).

Layer counting, BatchNorm and the feature cache are :mod:`posthoc.methods._layerwise`'s.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from .. import distributed
from ..ensemble import Combine, Ensemble
from ..metrics import scores
from ..options import option
from ..sources import member_name
from ._layerwise import RetrainConfig, Retrainer, cache_megabytes, retrain, select_data, training_data
from .base import BoostContext, Method, Stopwatch
from .registry import register


@dataclass
class LastLayerConfig(RetrainConfig):
    last_layers: int | None = option(
        2, "Layers retrained one at a time, last first: 1 = the classifier, 2 = also the last block, ...", ge=1
    )

    def validate(self) -> None:
        super().validate()
        if self.last_layers is None:
            from ..errors import PosthocError

            raise PosthocError("--last-layers must be at least 1 for lastlayer (1 = the classifier only)")


@register
class LastLayer(Method):
    name = "lastlayer"
    Config = LastLayerConfig
    summary = "Retrain the classifier, then earlier blocks one at a time (last first) on cached activations; one network."

    def fit_budget(self, parents: list, budget: float, given: set[str]) -> list[str]:
        """One network: any budget of at least 1.0 holds it."""
        return [f"--inference-budget {budget:g}: lastlayer always writes one network (1.00x)"]

    def build(self, ctx: BoostContext) -> Ensemble | None:
        cfg: LastLayerConfig = self.config
        model = copy.deepcopy(ctx.parent).eval()
        retrainer = Retrainer(model, cfg.last_layers)
        datas, seconds = training_data(ctx, [retrainer.base], cfg)
        sel_caches, sel_y = select_data(ctx, [retrainer.base])
        if not distributed.is_main():  # the caches were gathered on rank 0, which retrains
            return None
        (data,), (sel_cache,) = datas, sel_caches
        ctx.note("cache_mb", round(cache_megabytes(data.cache, sel_cache), 1))
        ctx.note("select_before", scores(retrainer.logits(sel_cache, ctx.device), sel_y))
        ctx.note("optimizer", cfg.recipe(model).record())
        clock = Stopwatch()
        name = member_name(ctx.parent_specs[0])
        stages = retrain(
            retrainer,
            data,
            sel_cache,
            sel_y,
            cfg,
            ctx.device,
            seed=cfg.seed,
            calibrated=ctx.temperature_scaling,
            amp=ctx.amp,
            show_progress=ctx.show_progress,
            log=ctx.log,
            name=name,
        )
        ctx.log(f"caching {seconds:.1f} s, retraining {clock.seconds:.1f} s")
        ctx.note("stages", [s.summary() for s in stages])
        ctx.note("select_after", scores(retrainer.logits(sel_cache, ctx.device), sel_y))
        return Ensemble.from_models([model], [name], Combine(rule="prob_mean"))
