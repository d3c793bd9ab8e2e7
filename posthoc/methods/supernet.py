"""``supernet``: SuperNet coupling of several networks (Bukowski 2020, §3.2-3.3, §4.1).

The members' penultimate features are concatenated and fed to one new linear layer with C outputs,
the *coupling* layer; the members are frozen and only that layer is trained, with a fresh optimizer,
on the training images, for a few epochs. The artifact uses the ``coupling`` combine rule:
``softmax(coupling(concat(features_1..K)) / T)``.

Where the members come from:

- **Several checkpoints** (``posthoc boost A B C D --method supernet``): one member per checkpoint,
  coupled as they are (the thesis's main experiment); ``--retrain-layers N`` first retrains each
  one's last layers (the thesis's combined recipe, §4.1).
- **One checkpoint**: ``--copies K`` (default 4) copies whose last ``--retrain-layers`` layers
  (default 2: the classifier, then the last block) are retrained with different seeds, so different
  data orders (``--bootstrap``: also different bootstrap samples), which makes their features differ.
  Everything before those layers is shared and the artifact stores and runs it once.

Choices where the thesis is silent or ambiguous, and ours:

- **Initialisation**: the members' classifier weights stacked side by side, divided by ``--scale``
  (default K), biases averaged. With scale K the layer computes exactly the mean of the members'
  logits, so training starts at logit averaging; the thesis found larger factors sometimes better
  (up to 60), and ``--scale 1`` is its "copied, not scaled" variant (the sum of the logits).
- **Training**: a fresh Adam (``--coupling-optimizer``) at a cosine-annealed ``--coupling-lr`` for
  ``--coupling-epochs`` epochs, on the members' features of the training images (derived from the
  cached activations of the retraining stages, so no extra pass over the images; one pass with
  ``--no-feature-cache``), BatchNorm and dropout in eval mode; the epoch with the best select-part
  NLL is kept, epoch 0 (logit averaging) included.
- **Overconfidence** (the thesis's "loss function dilemma"): the members were trained on the very
  images the layer is trained on, so it learns to trust them more than it should. On the CIFAR-10
  parents every training epoch raised the raw select NLL above logit averaging (0.494 -> 0.50-0.59,
  ECE 1.6% -> 5-7%) while the NLL after temperature scaling fell (0.4936 -> 0.4876, 2-fold
  cross-validated on the select part). So ``--temperature-scaling`` is on by default: one temperature
  is fitted on the select part and stored in the artifact, and epochs are compared after each is
  scaled by its own temperature. The select-part ECE before and after is recorded. ``--l2`` adds
  ``l2 * sum(w^2)`` over the layer's weight and bias (the thesis's Keras regulariser); it pulls
  towards zero, not towards the initialisation, and did not help (select NLL after scaling 0.4885 at
  1e-3 vs 0.4876 without).
- **Features**: timm's ``forward_head(x, pre_logits=True)`` of each member, in member order (what the
  fused artifact computes).
- **Copies of one checkpoint**: retrained at a high rate (SGD 0.05) on bootstrap samples, and each
  layer keeps its *last* epoch (``--select-by last``): selecting on each copy's own select NLL keeps
  the starting block (a no-op, see :mod:`~posthoc.methods.lastlayer`), so the copies would not differ.
  Even so, copies of a converged network stay close (about 2% pairwise disagreement against 13% for
  independently trained checkpoints), which bounds what the coupling can gain.
- Layer retraining follows :mod:`posthoc.methods.lastlayer` (layers, BatchNorm, feature cache and
  augmentation are documented there).

Defaults, measured on the CIFAR-10 ResNet-18 parents (val:select, 2,000 images), coupling s0..s3:
Adam at 1e-4 (scaled NLL 0.4875; 3e-5 0.4886; 1e-3 the same 0.4876 with noisier epochs); scale K
(8, 16 and 1 ended within 0.001 of it, starting far worse); 10 epochs (flat by epoch 8-10).
Copies of s0: SGD 0.05 and 0.02 gave the same result (select top-1 81.75/81.80%, scaled NLL
0.5304/0.5311); a light-augmented cache was worse (81.55%, 0.5392).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass

import torch
from torch import nn

from ..ensemble import Combine, Ensemble
from ..errors import PosthocError
from ..sources import member_name
from . import register
from .base import BoostContext, Method, Stopwatch, option
from .lastlayer import (
    OPTIMIZERS,
    RetrainConfig,
    Retrainer,
    TrainingData,
    batches_of,
    cache_inputs,
    cache_megabytes,
    epoch_order,
    fit_temperature,
    retrain,
    run_cached,
    scores,
    select_data,
    train_stage,
    training_data,
)


@dataclass
class SuperNetConfig(RetrainConfig):
    retrain_layers: int | None = option(None, "Layers of each member retrained before coupling, last first (default: 2 from one parent, 0 from several).")
    lr: float = option(0.05, "Learning rate of the layer stages (cosine-annealed over each stage); high, so that copies move apart.")
    bootstrap: bool | None = option(None, "Train each member on a bootstrap sample of the training images (default: on for copies of one parent).")
    select_by: str | None = option(None, "Per layer keep the best select nll or top1 epoch, or the last (default: last for copies of one parent, else nll).")
    temperature_scaling: bool = option(True, "Fit a temperature on the select part after training (stored in the artifact).")
    copies: int | None = option(None, "Members made from each parent (default: 4 from one parent, 1 from each of several).")
    scale: float | None = option(None, "Coupling init: stacked member classifiers divided by this (default: the number of members K = logit averaging).")
    l2: float = option(0.0, "L2 penalty l2 * sum(w^2) on the coupling layer's weight and bias.")
    coupling_epochs: int = option(10, "Epochs of coupling-layer training (the best by select NLL is kept).")
    coupling_optimizer: str = option("adam", "Optimizer of the coupling layer: adam or sgd (momentum 0.9).")
    coupling_lr: float = option(1e-4, "Learning rate of the coupling layer (cosine-annealed).")

    def validate(self) -> None:
        super().validate()
        if self.copies is not None and self.copies < 1:
            raise PosthocError(f"--copies must be at least 1, got {self.copies}")
        if self.copies is not None and self.copies > 1 and self.retrain_layers is not None and self.retrain_layers < 2:
            raise PosthocError(f"copies of one checkpoint differ only if their last block is retrained: use --retrain-layers 2 or more with --copies {self.copies}")
        if self.scale is not None and not self.scale > 0:
            raise PosthocError(f"--scale must be positive, got {self.scale}")
        if self.l2 < 0:
            raise PosthocError(f"--l2 must be 0 or more, got {self.l2}")
        if self.coupling_epochs < 0:
            raise PosthocError(f"--coupling-epochs must be 0 or more, got {self.coupling_epochs}")
        if self.coupling_optimizer not in OPTIMIZERS:
            raise PosthocError(f"--coupling-optimizer must be adam or sgd, got '{self.coupling_optimizer}'")
        if not self.coupling_lr > 0:
            raise PosthocError(f"--coupling-lr must be positive, got {self.coupling_lr}")

    def resolved(self, parents: int) -> "SuperNetConfig":
        """This config with the defaults that depend on the number of ``parents`` filled in."""
        copies = self.copies if self.copies is not None else (4 if parents == 1 else 1)
        layers = self.retrain_layers if self.retrain_layers is not None else (2 if copies > 1 else 0)
        if copies > 1 and layers < 2:
            raise PosthocError(
                f"from one checkpoint supernet makes {copies} copies, which differ only if their last block is "
                f"retrained: use --retrain-layers 2 or more (got {layers}), or --copies 1"
            )
        if self.bootstrap and not self.feature_cache:
            raise PosthocError("--bootstrap needs the feature cache; drop --no-feature-cache")
        return dataclasses.replace(
            self, copies=copies, retrain_layers=layers,
            bootstrap=self.bootstrap if self.bootstrap is not None else (copies > 1 and self.feature_cache),
            select_by=self.select_by or ("last" if copies > 1 else "nll"),
        )


def coupling_init(classifiers: list[nn.Module], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The coupling layer's start: classifier weights side by side (member order) divided by
    ``scale``, biases averaged (thesis §3.2). With ``scale = K`` it computes the mean of the logits."""
    weight = torch.cat([c.weight.detach().float().cpu() for c in classifiers], dim=1) / scale
    biases = [c.bias.detach().float().cpu() if c.bias is not None else torch.zeros(c.weight.shape[0]) for c in classifiers]
    return weight, torch.stack(biases).mean(0)


def mean_disagreement(member_logits: list[torch.Tensor]) -> float:
    """Mean pairwise disagreement (%) of the members' top-1 predictions."""
    preds = [l.argmax(-1) for l in member_logits]
    pairs = [(i, j) for i in range(len(preds)) for j in range(i + 1, len(preds))]
    if not pairs:
        return 0.0
    return 100.0 * sum(float((preds[i] != preds[j]).float().mean()) for i, j in pairs) / len(pairs)


@register
class SuperNet(Method):
    name = "supernet"
    Config = SuperNetConfig
    summary = "Couple members' penultimate features with one trained linear layer (SuperNet); from several checkpoints or retrained copies of one."
    card_text = (
        "SuperNet (Bukowski 2020): the members' penultimate features are concatenated and mapped to the classes by "
        "one linear layer, initialised from the members' stacked classifiers (scaled) and trained on the training "
        "images with the members frozen; the epoch with the best validation (select) NLL is kept, and a temperature "
        "fitted on the select split is applied. Members are independently trained checkpoints, or copies of one "
        "checkpoint whose last layers were retrained with different seeds (the trunk before them is shared)."
    )
    min_parents = 1
    max_parents = None

    def build(self, ctx: BoostContext) -> Ensemble:
        cfg: SuperNetConfig = self.config.resolved(len(ctx.parents))
        copies, layers = cfg.copies, cfg.retrain_layers
        ctx.note("resolved", {"copies": copies, "retrain_layers": layers, "bootstrap": cfg.bootstrap, "select_by": cfg.select_by})

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
        timing = {"caching": seconds}  # logged, not stored: the same seed must give a bit-identical artifact
        ctx.note("cache_mb", round(cache_megabytes(*[d.cache for d in datas], *sel_caches), 1))

        clock = Stopwatch()
        stage_caches: dict[int, dict] = {}
        retrained = []
        for i, (name, p, r) in enumerate(members):
            if layers:
                seed = cfg.seed * 1_000_003 + 1009 * p + (i % copies)
                stages = retrain(r, datas[p], sel_caches[p], sel_y, cfg, ctx.device, seed=seed,
                                 stage_caches=stage_caches.setdefault(p, {}), show_progress=ctx.show_progress, log=ctx.log, name=name)
                retrained.append({"member": name, "stages": [s.summary() for s in stages]})
        if retrained:
            ctx.note("retraining", retrained)
        timing["retraining"] = clock.seconds

        # member features on the training images and the select part
        clock = Stopwatch()
        train_feats, sel_feats, sel_logits = [], [], []
        stream = not cfg.feature_cache
        if stream:
            loader = ctx.train_loader(256, shuffle=False, seed=cfg.seed, augment=cfg.cache_augment)
            feature_cuts = [_FeatureCut(r) for _, _, r in members]
            feats_all, train_y = cache_inputs(feature_cuts, loader, ctx.device, show_progress=ctx.show_progress, description="member features")
            train_feats = [f[0] for f in feats_all]
        else:
            train_y = datas[0].targets
        for i, (name, p, r) in enumerate(members):
            if not stream:
                train_feats.append(run_cached(lambda e, r=r: r.base.outputs(e)[0], datas[p].cache, ctx.device)[0])
            f, lg = run_cached(lambda e, r=r: r.base.outputs(e), sel_caches[p], ctx.device)
            sel_feats.append(f)
            sel_logits.append(lg)
        timing["features"] = clock.seconds
        ctx.note("members_select", {n: scores(lg, sel_y) for n, lg in zip(names, sel_logits)})
        ctx.note("member_disagreement", round(mean_disagreement(sel_logits), 3))
        prob_mean = torch.stack([lg.softmax(-1) for lg in sel_logits]).mean(0)
        ctx.note("prob_mean_select", scores(prob_mean.clamp_min(1e-12).log(), sel_y))

        # the coupling layer
        clock = Stopwatch()
        classifiers = [r.model.get_classifier() for _, _, r in members]
        scale = cfg.scale if cfg.scale is not None else float(len(members))
        weight, bias = coupling_init(classifiers, scale)
        layer = nn.Linear(weight.shape[1], weight.shape[0]).to(ctx.device)
        with torch.no_grad():
            layer.weight.copy_(weight)
            layer.bias.copy_(bias)
        f_train = torch.cat(train_feats, dim=1)
        f_sel = torch.cat(sel_feats, dim=1)
        del train_feats
        data = TrainingData((f_train,), train_y)
        order = torch.arange(len(train_y))

        def batches(epoch):
            return data.batches(epoch_order(order, cfg.seed + 7, epoch), cfg.batch_size, None, ctx.device, epoch)

        def select_inputs():
            return run_cached(lambda e: layer(e[0]), (f_sel,), ctx.device)[0], sel_y

        best, history = train_stage(
            lambda e: layer(e[0]), list(layer.parameters()), [], batches, select_inputs,
            epochs=cfg.coupling_epochs, optimizer=cfg.coupling_optimizer, lr=cfg.coupling_lr, l2=cfg.l2,
            steps_per_epoch=len(batches_of(order, cfg.batch_size)), select_by="nll",
            calibrated=cfg.temperature_scaling, show_progress=ctx.show_progress, description="coupling",
        )
        timing["coupling"] = clock.seconds
        ctx.note("coupling", {"scale": scale, "features": int(weight.shape[1]), "best_epoch": best, "select": history})
        logits = select_inputs()[0]
        ctx.log(f"coupling layer ({weight.shape[1]} features -> {weight.shape[0]} classes): best epoch {best}, "
                f"select top-1 {history[best]['top1']:.2f}% NLL {history[best]['nll']:.4f} ECE {history[best]['ece']:.2f}%")
        temperature = 1.0
        if cfg.temperature_scaling:
            temperature = fit_temperature(logits, sel_y)
            after = scores(logits, sel_y, temperature)
            ctx.note("temperature", round(temperature, 5))
            ctx.note("select_after_temperature", after)
            ctx.log(f"temperature {temperature:.3f}: select NLL {after['nll']:.4f}, ECE {after['ece']:.2f}%")

        ctx.log("wall time: " + ", ".join(f"{k} {v:.1f} s" for k, v in timing.items()))

        # the artifact: members grouped by architecture; coupling columns follow the final member order
        models = [r.model for _, _, r in members]
        ens = Ensemble.from_models(models, names)
        dims = [c.weight.shape[1] for c in classifiers]
        starts = [sum(dims[:i]) for i in range(len(dims))]
        w = layer.weight.detach().cpu()
        columns = [w[:, starts[names.index(n)] : starts[names.index(n)] + dims[names.index(n)]] for n in ens.member_names]
        ens.combine = Combine(rule="coupling", temperature=temperature, coupling_weight=torch.cat(columns, dim=1).contiguous(),
                              coupling_bias=layer.bias.detach().cpu().clone())
        ens.__post_init__()  # validate the coupling layer against the members
        return ens


class _FeatureCut:
    """A whole member as a 'cut' whose cached inputs are its penultimate features (for streaming)."""

    def __init__(self, retrainer: Retrainer):
        self.net = retrainer.net

    def inputs(self, x: torch.Tensor):
        return (self.net(x)[0],)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n}#{seen[n]}")
    return out
