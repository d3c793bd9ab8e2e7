"""``supernet``: SuperNet coupling of several networks (Bukowski 2020, §3.2-3.3, §4.1).

The members' penultimate features are concatenated and fed to one new linear layer with C outputs,
the *coupling* layer; the members are frozen and only that layer is trained on the training images.
The artifact uses the ``coupling`` combine rule: ``softmax(coupling(concat(features_1..K)) / T)``.
Members are several checkpoints (the thesis's main experiment; ``--last-layers N`` first retrains
each one's last layers, §4.1), or ``--copies K`` copies of one checkpoint whose last layers are
retrained with different seeds and bootstrap samples (the trunk before them is shared).

Choices where the thesis is silent or ambiguous:

- **Initialisation**: the members' classifier weights side by side divided by ``--coupling-divisor``
  (default K: exactly logit averaging before training), biases averaged; the thesis also tried larger
  divisors, and 1 is its "copied, not scaled" variant.
- **Training**: a fresh Adam at a cosine-annealed rate on the members' cached training features; the
  epoch with the best select NLL after fitting its own temperature is kept, epoch 0 included.
- **Overconfidence** (the thesis's "loss function dilemma"): the members were trained on the very
  images the layer is trained on, so it learns to trust them too much: epochs are compared after
  each one's own temperature, and boost's final temperature (``--temperature-scaling``) is kept.
- **Copies of one checkpoint** are retrained at a high rate (SGD 0.05 for a BatchNorm network, AdamW
  5e-4 for any other: :func:`posthoc.training.fine_tune_recipe`) on bootstrap samples and each layer
  keeps its *last* epoch, so the copies move apart.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from .. import distributed
from ..cost import fits, predicted_ratio, split_flops
from ..ensemble import Ensemble
from ..errors import PosthocError
from ..metrics import mean_disagreement, scores
from ..options import Renamed, option
from ..runtime import derive_seed
from ..sources import member_name
from ..training import FINE_TUNE_RATES, FamilyRates, cache_outputs, run_cached
from ._coupling import CouplingConfig, couple
from ._layerwise import RetrainConfig, Retrainer, cache_megabytes, retrain, select_data, training_data
from .base import BoostContext, Method, Stopwatch
from .registry import register


@dataclass
class SuperNetConfig(RetrainConfig, CouplingConfig):
    rates: ClassVar[FamilyRates] = FINE_TUNE_RATES["supernet"]
    renamed: ClassVar[dict[str, Renamed]] = {**RetrainConfig.renamed, "scale": Renamed("coupling_divisor")}

    last_layers: int | None = option(
        None, "Layers of each member retrained before coupling, last first (default: 2 from one parent, 0 from several).", ge=0
    )
    lr: float | None = option(
        None,
        "Learning rate of the layer stages, cosine-annealed over each stage; high, so that copies move apart "
        f"(default: {FINE_TUNE_RATES['supernet'].describe('lr')}).",
        gt=0,
    )
    bootstrap: bool | None = option(
        None, "Train each member on a bootstrap sample of the training images (default: on for copies of one parent)."
    )
    select_by: str | None = option(
        None,
        "Per layer keep the best select nll or top1 epoch, or the last (default: last for copies of one parent, else nll).",
        choices=("nll", "top1", "last"),
    )
    copies: int | None = option(None, "Members made from each parent (default: 4 from one parent, 1 from each of several).", ge=1)

    def validate(self) -> None:
        super().validate()
        if self.copies is not None and self.copies > 1 and self.last_layers is not None and self.last_layers < 2:
            raise PosthocError(
                f"copies of one checkpoint differ only if their last block is retrained: use --last-layers 2 or more with --copies {self.copies}"
            )

    def resolved(self, parents: int) -> SuperNetConfig:
        """This config with the defaults that depend on the number of ``parents`` filled in."""
        copies = self.copies if self.copies is not None else (4 if parents == 1 else 1)
        layers = self.last_layers if self.last_layers is not None else (2 if copies > 1 else 0)
        if copies > 1 and layers < 2:
            raise PosthocError(
                f"from one checkpoint supernet makes {copies} copies, which differ only if their last block is "
                f"retrained: use --last-layers 2 or more (got {layers}), or --copies 1"
            )
        return dataclasses.replace(
            self,
            copies=copies,
            last_layers=layers,
            bootstrap=self.bootstrap if self.bootstrap is not None else (copies > 1 and self.feature_cache),
            select_by=self.select_by or ("last" if copies > 1 else "nll"),
        )


@register
class SuperNet(Method):
    name = "supernet"
    Config = SuperNetConfig
    summary = "Couple members' penultimate features with one trained linear layer (SuperNet); from several checkpoints or retrained copies of one."
    min_parents = 1
    max_parents = None

    def fit_budget(self, parents: list[nn.Module], budget: float, given: set[str]) -> list[str]:
        """Several checkpoints run whole (N x, which must fit); copies of one share the trunk before their
        retrained layers, and as many copies as fit (up to ``--copies``, at least 2) are made."""
        cfg = self.config.resolved(len(parents))
        if len(parents) > 1:
            if not fits(float(len(parents)), budget):
                raise PosthocError(
                    f"a SuperNet of {len(parents)} checkpoints runs {len(parents)} full networks ({len(parents)}.00x), over "
                    f"--inference-budget {budget:g}; couple fewer checkpoints or raise the budget"
                )
            return [f"--inference-budget {budget:g}: {len(parents)} checkpoints coupled ({len(parents)}.00x)"]
        if "copies" in given:
            return [f"--copies was given: it overrides --inference-budget {budget:g}"]
        split = split_flops(parents[0], cfg.last_layers)
        copies = next((k for k in range(cfg.copies, 1, -1) if fits(predicted_ratio(split, k), budget)), None)
        if copies is None:  # one network: the coupling layer over the parent's own features, a retrained head
            self.configure(copies=1, last_layers=None if "last_layers" not in given else cfg.last_layers)
            return [
                f"--inference-budget {budget:g}: two copies would cost {predicted_ratio(split, 2):.2f}x; supernet "
                "trains one coupling layer over the parent's features (one network)"
            ]
        self.configure(copies=copies)
        return [f"--inference-budget {budget:g}: supernet couples {copies} copies retraining the last {cfg.last_layers} layers"]

    def build(self, ctx: BoostContext) -> Ensemble | None:
        cfg: SuperNetConfig = self.config.resolved(len(ctx.parents))
        copies, layers = cfg.copies, cfg.last_layers
        ctx.note("resolved", {"copies": copies, "last_layers": layers, "bootstrap": cfg.bootstrap, "select_by": cfg.select_by})
        if layers:
            ctx.note("optimizer", cfg.recipe(ctx.parent).record())

        # members start as copies of their parent (the parents themselves stay untouched)
        members: list[tuple[str, int, Retrainer]] = []
        parent_retrainers = []
        for p, (spec, parent) in enumerate(zip(ctx.parent_specs, ctx.parents)):
            first = copy.deepcopy(parent).eval()
            models = [first] + [copy.deepcopy(first) for _ in range(copies - 1)]
            base_name = member_name(spec)
            for k, m in enumerate(models):
                r = Retrainer(m, layers)
                if k == 0:
                    parent_retrainers.append(r)
                members.append((f"{base_name}/{k}" if copies > 1 else base_name, p, r))
        names = _unique([n for n, _, _ in members])

        # one pass over the images: each parent's frozen part (copies of a parent share it)
        cuts = [r.base for r in parent_retrainers]
        datas, seconds = training_data(ctx, cuts, cfg)
        sel_caches, sel_y = select_data(ctx, cuts)
        if not distributed.is_main():  # the caches were gathered on rank 0, which retrains and couples
            return None
        timing = {"caching": seconds}  # logged, not stored: the same seed must give a bit-identical artifact
        ctx.note("cache_mb", round(cache_megabytes(*[d.cache for d in datas], *sel_caches), 1))

        clock = Stopwatch()
        stage_caches: dict[int, dict] = {}
        retrained = []
        for i, (name, p, r) in enumerate(members):
            if layers:
                stages = retrain(
                    r,
                    datas[p],
                    sel_caches[p],
                    sel_y,
                    cfg,
                    ctx.device,
                    seed=derive_seed(cfg.seed, 1009 * p + i % copies),
                    stage_caches=stage_caches.setdefault(p, {}),
                    amp=ctx.amp,
                    show_progress=ctx.show_progress,
                    log=ctx.log,
                    name=name,
                )
                retrained.append({"member": name, "stages": [s.summary() for s in stages]})
        if retrained:
            ctx.note("retraining", retrained)
        timing["retraining"] = clock.seconds

        # member features on the training images and the select part
        clock = Stopwatch()
        if cfg.feature_cache:
            train_feats = [run_cached(lambda e, r=r: r.base.outputs(e)[0], datas[p].cache, ctx.device)[0] for _, p, r in members]
            train_y = datas[0].targets
        else:
            loader = ctx.train_loader(256, shuffle=False, seed=cfg.seed, augment=cfg.cache_augment)
            fns: list[Callable] = [lambda x, r=r: (r.net(x)[0],) for _, _, r in members]
            feats_all, train_y = cache_outputs(
                fns, loader, ctx.device, show_progress=ctx.show_progress, description="member features"
            )
            train_feats = [f[0] for f in feats_all]
        sel_feats, sel_logits = zip(
            *(run_cached(lambda e, r=r: r.base.outputs(e), sel_caches[p], ctx.device) for _, p, r in members)
        )
        timing["features"] = clock.seconds
        ctx.note("members_select", {n: scores(lg, sel_y) for n, lg in zip(names, sel_logits)})
        ctx.note("member_disagreement", round(mean_disagreement(list(sel_logits)), 3))
        prob_mean = torch.stack([lg.softmax(-1) for lg in sel_logits]).mean(0)
        ctx.note("prob_mean_select", scores(prob_mean.clamp_min(1e-12).log(), sel_y))

        clock = Stopwatch()
        ensemble = couple(
            [r.model for _, _, r in members],
            names,
            train_feats,
            train_y,
            list(sel_feats),
            sel_y,
            cfg,
            ctx,
            batch_size=cfg.batch_size,
            calibrated=ctx.temperature_scaling,
        )
        timing["coupling"] = clock.seconds
        ctx.log("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))
        return ensemble


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
