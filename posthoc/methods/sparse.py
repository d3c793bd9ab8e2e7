"""``sparse``: Sparse Subnetwork Ensembles, prune and tune (Whitaker 2023, ch. 5-6).

Each child starts from the parent with a random subset of its conv and linear weights pruned
(``--keep`` of them kept, layerwise) and is retrained briefly with a high-rate one-cycle schedule, which
pushes it out of the parent's basin; the children (and the parent with ``--include-parent``) are
averaged as probabilities, or coupled by a trained SuperNet layer (``--couple``). ``--keep 1.0`` prunes
nothing: the children are only re-tuned with the one-cycle schedule (the dense ablation).

Defaults: two dense children (``--keep 1.0``) of two epochs each at ``--max-lr 0.05``, plus the parent
(chosen on the select part: ``benchmarks/results/sparse_select.md``). Any pruning option
(``--partition``, ``--anneal``, ``--structure``, ...) given without ``--keep`` prunes half the weights,
the thesis's recipe.

Choices where the thesis is silent or inconsistent:

- **Partitioned siblings** (``--partition P``): one random assignment of every prunable weight to
  exactly one of P siblings, so their masks are disjoint and cover the parent (P=2: mask and
  anti-mask); ``--members K`` children are K/P independent groups. The thesis gives no algorithm for
  P > 2; a uniform assignment is the one that maximises the total mask distance.
- **Pruned weights stay exactly zero**: masks act through ``torch.nn.utils.parametrize`` (the stored
  weight is multiplied by the mask in every forward pass; the thesis does not say whether momentum is
  masked, and with a parametrization the question does not arise), and the final child is the masked
  weight.
- **Schedule**: ``torch.optim.lr_scheduler.OneCycleLR`` stepped per batch, two phases with cosine
  annealing and momentum cycled inversely (0.95 -> 0.85 -> 0.95), exactly the thesis's 1C policy with
  ``--div-factor 100 --final-div-factor 1e4``; ``--schedule constant`` is its FT baseline.
- **Stochastic annealing** (ch. 6, ``--anneal temperature|random``): every minibatch uses a fresh
  Bernoulli mask in the forward pass only (keep probability 1 for kept weights and tau for pruned ones,
  tau cosine-annealed from ``--tau0`` to 0; or the "random" schedule from a uniform draw to the
  target), never written into the stored weights (the trap in Algorithm 3's pseudo-code); once tau is 0
  the child is exactly the pruned child.
- **BatchNorm** statistics are re-estimated for every child after tuning (``--bn-batches``), and the
  combination is softmax-then-mean (the thesis's stated rule; its pseudo-code's parent member is
  ``--include-parent``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from .. import distributed
from ..ensemble import Combine, Ensemble, MemberGroup
from ..errors import PosthocError
from ..graph import FeaturesAndLogits
from ..metrics import mean_disagreement, scores
from ..options import option
from ..runtime import derive_seed, seeded_generator
from ..timm_io import last_layers, timm_config
from ..training import ImageBatches, cache_outputs, cycle, has_batchnorm, recalibrate_bn, sgd_with_schedule, train_steps
from ._coupling import CouplingConfig, couple
from .base import BoostContext, Method, Stopwatch
from .registry import register


@dataclass
class SparseConfig(CouplingConfig):
    members: int = option(3, "Members of the artifact: the children, plus the parent with --include-parent.", ge=1)
    keep: float = option(
        1.0,
        "Fraction of each prunable tensor's weights a child keeps; 1.0 prunes nothing (default: 0.5, the thesis's, once "
        "another pruning option is given).",
        gt=0,
        le=1,
    )
    partition: int | None = option(
        None,
        "Siblings per mask group, their masks disjoint and covering the parent (default: 1/keep when that is a whole number > 1, else 1).",
        ge=1,
    )
    structure: str = option(
        "unstructured",
        "Prune single weights (unstructured) or whole output channels (channel).",
        choices=("unstructured", "channel"),
    )
    mask_source: str = option(
        "random",
        "Random masks, or l1: keep each tensor's largest weights (children then differ only by data order).",
        choices=("random", "l1"),
    )
    prune_first_conv: bool = option(False, "Also prune the stem's first convolution.")
    prune_classifier: bool = option(True, "Also prune the classifier.")
    last_layers: int | None = option(
        None,
        "Prune and tune only the last N layers, the rest frozen and shared by every child: 1 = the classifier, "
        "2 = also the last block, ... (default: all).",
        ge=1,
    )
    schedule: str = option(
        "onecycle",
        "Learning rate per batch: onecycle (warm-up to --max-lr, cosine down) or constant (--max-lr throughout).",
        choices=("onecycle", "constant"),
    )
    max_lr: float = option(0.05, "Peak learning rate of each child's tuning.", gt=0)
    pct_start: float = option(0.1, "Fraction of the tuning spent warming up (onecycle).", gt=0, lt=1)
    div_factor: float = option(100.0, "Initial learning rate = max-lr / div-factor (onecycle).", gt=0)
    final_div_factor: float = option(1e4, "Final learning rate = initial / final-div-factor (onecycle).", gt=0)
    momentum: float = option(
        0.9, "SGD momentum (Nesterov) with --schedule constant; onecycle cycles it between 0.85 and 0.95.", ge=0, lt=1
    )
    weight_decay: float = option(5e-4, "SGD weight decay.", ge=0)
    child_epochs: float = option(2.0, "Epochs of tuning per child over the training split (fractions allowed).", gt=0)
    batch_size: int = option(128, "Tuning batch size.", ge=1)
    augment: str = option(
        "light", "Tuning augmentation: light (pad-crop + flip), timm, or none.", choices=("light", "timm", "none")
    )
    bootstrap: bool = option(False, "Tune each child on its own bootstrap sample of the training images.")
    anneal: str = option(
        "none",
        "Stochastic subnetwork annealing of the pruned weights: none, temperature or random.",
        choices=("none", "temperature", "random"),
    )
    tau0: float = option(0.5, "Starting keep probability of pruned weights (--anneal temperature).", ge=0, le=1)
    anneal_epochs: float = option(0.3, "Epochs over which annealing reaches the pruned child.", gt=0)
    include_parent: bool = option(True, "Make the unmodified parent one of the members (default off with --couple).")
    couple: bool = option(False, "Combine the children with a trained SuperNet coupling layer instead of the probability mean.")
    bn_batches: int = option(
        32, "Training batches (of 128, eval transform) re-estimating each child's BatchNorm; 0 keeps the tuned statistics.", ge=0
    )

    @classmethod
    def implied(cls, values: dict[str, Any]) -> dict[str, Any]:
        """A pruning option given without ``--keep`` prunes half the weights (the thesis's default), and
        ``--couple`` without ``--include-parent`` leaves the parent out (the layer couples children)."""
        values = dict(values)
        pruning = ("partition", "structure", "mask_source", "anneal", "prune_first_conv", "prune_classifier")
        if values.get("keep") is None and any(values.get(k) not in (None, cls.__dataclass_fields__[k].default) for k in pruning):
            values["keep"] = 0.5
        if values.get("couple") and values.get("include_parent") is None:
            values["include_parent"] = False
        return values

    @property
    def children(self) -> int:
        """Children tuned: every member but the parent."""
        return self.members - int(self.include_parent)

    @property
    def siblings(self) -> int:
        """Siblings per mask group (``--partition`` resolved)."""
        if self.partition is not None:
            return self.partition
        inverse = 1.0 / self.keep
        return round(inverse) if self.keep < 1 and abs(inverse - round(inverse)) < 1e-6 and self.mask_source == "random" else 1

    @property
    def parent_epochs(self) -> float:
        """The training budget in parent-epochs: children x epochs per child."""
        return self.children * self.child_epochs

    def validate(self) -> None:
        if self.children < 1:
            raise PosthocError(f"--members {self.members} leaves no child besides the parent; raise --members")
        p = self.siblings
        if p > 1 and abs(self.keep * p - 1) > 1e-6:
            raise PosthocError(
                f"--partition {p} gives each sibling 1/{p} of the weights, so --keep must be {1 / p:.4g} (got {self.keep})"
            )
        if p > 1 and self.mask_source == "l1":
            raise PosthocError("--mask-source l1 gives every child the same mask; it cannot be partitioned (use --partition 1)")
        if self.anneal != "none" and self.keep == 1:
            raise PosthocError(f"--anneal {self.anneal} anneals pruned weights, and --keep 1.0 prunes none; lower --keep")
        if self.anneal == "random" and p > 2:
            raise PosthocError("--anneal random is defined for independent masks or pairs (--partition 1 or 2)")
        if self.couple and self.include_parent:
            raise PosthocError("--couple trains a layer over the children only; drop --include-parent")


# ------------------------------------------------------------------------------------ masks
def prunable_tensors(model: nn.Module, cfg: SparseConfig) -> list[str]:
    """Conv and linear weights a child prunes, in the model's order (first conv and classifier by option)."""
    names = [f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear))]
    head = model.get_classifier()
    head_names = {
        f"{n}.weight" for n, m in model.named_modules() if m is head or (isinstance(head, nn.Module) and m in head.modules())
    }
    if not cfg.prune_classifier:
        names = [n for n in names if n not in head_names]
    if not cfg.prune_first_conv and names:
        first_conv = next(
            (f"{n}.weight" for n, m in model.named_modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d))), None
        )
        names = [n for n in names if n != first_conv]
    if cfg.last_layers is not None:
        allowed = {name for group in last_layers(model, cfg.last_layers) for name in group}
        names = [n for n in names if n in allowed]
    if not names:
        raise PosthocError("no tensors to prune with these options; widen --last-layers or allow --prune-classifier")
    return names


@dataclass
class ChildMask:
    """What one child keeps: per tensor a 0/1 ``mask``, and ``score`` in [0, 1] (the uniform draw the
    mask thresholds, seen from this sibling), which the random annealing schedule starts from."""

    mask: dict[str, torch.Tensor]
    score: dict[str, torch.Tensor]


def group_masks(parent: nn.Module, names: list[str], cfg: SparseConfig, group: int) -> list[ChildMask]:
    """The masks of mask group ``group``: ``cfg.siblings`` disjoint masks covering every weight, or one
    independent mask keeping ``cfg.keep`` of each tensor (``random``), or its largest weights (``l1``).

    A uniform draw U per weight (per output channel with ``--structure channel``) seeded by (seed, group)
    assigns weight w to sibling ``floor(U * P)``; with one sibling the mask is ``U >= 1 - keep``.
    """
    p = cfg.siblings
    gen = seeded_generator(cfg.seed, group)
    masks: list[dict[str, torch.Tensor]] = [{} for _ in range(p)]
    scores_: list[dict[str, torch.Tensor]] = [{} for _ in range(p)]
    for name in names:
        w = parent.get_parameter(name).detach()
        shape = (w.shape[0],) + (1,) * (w.dim() - 1) if cfg.structure == "channel" else tuple(w.shape)
        if cfg.mask_source == "l1":  # layerwise magnitude: the largest weights (or channels by L1 norm)
            score = w.abs().float() if cfg.structure == "unstructured" else w.abs().float().flatten(1).sum(1).view(shape)
            k = max(1, round(cfg.keep * score.numel()))
            kept = (score >= score.flatten().topk(k).values.min()).expand(w.shape)
            masks[0][name], scores_[0][name] = kept, kept.float()
            continue
        u = torch.rand(shape, generator=gen).expand(w.shape)
        if p == 1:
            masks[0][name], scores_[0][name] = u >= 1 - cfg.keep, u
            continue
        slot = (u * p).floor().clamp(max=p - 1)
        for j in range(p):
            masks[j][name] = slot == j
            if p == 2:  # the uniform draw seen from each sibling: high means kept (random annealing)
                scores_[j][name] = u if j == 1 else 1 - u
    return [ChildMask({n: m.to(parent.get_parameter(n).device) for n, m in mk.items()}, sc) for mk, sc in zip(masks, scores_)]


class Masked(nn.Module):
    """Parametrization ``weight = stored * mask``: ``mask`` is the child's own, or a per-minibatch sample
    while annealing. Only the forward pass sees it; the stored weight is never overwritten."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.float32), persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask.to(weight.dtype)


class Annealer:
    """Draws every minibatch's forward masks of an annealed child (thesis ch. 6).

    ``temperature``: keep probability 1 for kept weights and ``tau`` for pruned ones, tau cosine-annealed
    from ``tau0`` to 0 over ``steps``; ``random``: probability ``(1 - a) * score + a * mask`` with ``a``
    rising linearly from 0 to 1. At the last step the sampled mask is the child's mask exactly.
    """

    def __init__(self, child: ChildMask, params: dict[str, Masked], cfg: SparseConfig, steps: int, seed: int):
        self.child, self.params, self.cfg, self.steps = child, params, cfg, max(1, steps)
        self.gen = seeded_generator(seed)

    def probability(self, name: str, step: int) -> torch.Tensor:
        t = min(step, self.steps) / self.steps
        mask = self.child.mask[name].float()
        if self.cfg.anneal == "temperature":
            tau = self.cfg.tau0 * 0.5 * (1 + math.cos(math.pi * t))
            return mask + (1 - mask) * tau
        return (1 - t) * self.child.score[name].float() + t * mask

    def draw(self, step: int) -> None:
        """Set every parametrization's mask for the batch after optimizer step ``step`` (0: the first)."""
        for name, masked in self.params.items():
            if step >= self.steps:
                masked.mask.copy_(self.child.mask[name])
                continue
            prob = self.probability(name, step)
            sample = torch.rand(prob.shape, generator=self.gen) < prob.cpu()
            masked.mask.copy_(sample.to(masked.mask.device))


# ------------------------------------------------------------------------------------ one child
def tune_child(
    parent: nn.Module, child: ChildMask | None, cfg: SparseConfig, ctx: BoostContext, index: int
) -> tuple[nn.Module, dict[str, Any]]:
    """Child ``index``: the parent with ``child``'s mask (``None``: dense), tuned on the training split.

    Independent of every other child (its data order, bootstrap sample, annealing and augmentation draws
    come from (seed, index)), so children can be tuned anywhere in any order: under torchrun each process
    tunes its own share. Returns the child in eval mode, its pruned weights exactly zero and its BatchNorm
    statistics re-estimated, and a summary.
    """
    seed = derive_seed(cfg.seed, 1000 + index)
    with torch.random.fork_rng(devices=[]):  # augmentations draw from the global generator: seed it per child
        torch.manual_seed(seed)
        return _tune(parent, child, cfg, ctx, index, seed)


def _tune(
    parent: nn.Module, child: ChildMask | None, cfg: SparseConfig, ctx: BoostContext, index: int, seed: int
) -> tuple[nn.Module, dict[str, Any]]:
    model = copy.deepcopy(parent).train()
    frozen_bn = _freeze_outside(model, cfg.last_layers)
    masked: dict[str, Masked] = {}
    for name, mask in (child.mask if child is not None else {}).items():
        owner, _, attr = name.rpartition(".")
        masked[name] = Masked(mask)
        parametrize.register_parametrization(model.get_submodule(owner), attr, masked[name])
    sample = None
    if cfg.bootstrap:
        sample = torch.randint(0, ctx.train_size, (ctx.train_size,), generator=seeded_generator(seed, 1)).tolist()
    loader = ctx.train_loader(cfg.batch_size, seed=seed, augment=cfg.augment, sample=sample)
    steps = max(1, round(cfg.child_epochs * len(loader)))
    params = [p for p in model.parameters() if p.requires_grad]
    opt, sched = sgd_with_schedule(
        params,
        steps,
        schedule=cfg.schedule,
        max_lr=cfg.max_lr,
        weight_decay=cfg.weight_decay,
        momentum=cfg.momentum,
        pct_start=cfg.pct_start,
        div_factor=cfg.div_factor,
        final_div_factor=cfg.final_div_factor,
    )
    annealer = None
    if cfg.anneal != "none" and child is not None:
        anneal_steps = round(min(cfg.anneal_epochs, cfg.child_epochs) / cfg.child_epochs * steps)
        annealer = Annealer(child, masked, cfg, anneal_steps, derive_seed(seed, 2))
        annealer.draw(0)
    for bn in frozen_bn:  # the shared trunk keeps the parent's statistics
        bn.eval()
    losses = train_steps(
        model,
        cycle(loader, steps),
        opt,
        steps=steps,
        scheduler=sched,
        device=ctx.device,
        amp=ctx.amp,
        after_step=annealer.draw if annealer else None,
        show_progress=ctx.show_progress,
        description=f"child {index + 1}/{cfg.children}",
    )
    for name, m in masked.items():  # the stored weight times the child's mask, exactly
        m.mask.copy_(child.mask[name])
        owner, _, attr = name.rpartition(".")
        parametrize.remove_parametrizations(model.get_submodule(owner), attr, leave_parametrized=True)
    model.eval()
    if cfg.bn_batches and has_batchnorm(model):
        batches = ImageBatches(lambda: ctx.train_loader(128, seed=cfg.seed, augment="none"), cfg.bn_batches)
        tuned = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in frozen_bn]
        recalibrate_bn(model, batches, ctx.device, modules=tuned if frozen_bn else None)
    window = max(1, len(losses) // 10)
    return model, {
        "steps": len(losses),
        "first_loss": round(sum(losses[:window]) / window, 5),
        "last_loss": round(sum(losses[-window:]) / window, 5),
    }


def _child(parent: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A tuned child back as a module (children travel between processes as state dicts)."""
    model = copy.deepcopy(parent)
    model.load_state_dict(state)
    return model.eval()


def _freeze_outside(model: nn.Module, layers: int | None) -> list[nn.Module]:
    """Freeze every parameter outside the last ``layers`` layers (``None``: nothing); return the BatchNorm
    layers outside them, which must keep the parent's statistics so the trunk stays shared."""
    if layers is None:
        return []
    scope = {n for group in last_layers(model, layers) for n in group}
    for name, p in model.named_parameters():
        p.requires_grad_(name in scope)
    owners = {n.rsplit(".", 1)[0] for n in scope}
    return [m for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and n not in owners]


# ------------------------------------------------------------------------------------ the method
@register
class Sparse(Method):
    name = "sparse"
    Config = SparseConfig
    summary = "Prune random subnetworks of the parent (partitioned masks) and tune each briefly with a one-cycle schedule."

    def fit_budget(self, parents: list[nn.Module], budget: float, given: set[str]) -> list[str]:
        """Children are full networks unless ``--last-layers`` confines them to the last layers (the rest
        shared): the widest part at which at least 4 members fit, with as many members as fit."""
        fit = self.fit_width_and_members(parents, budget, given)
        if fit is None:
            return [f"--members and --last-layers were given: they override --inference-budget {budget:g}"]
        layers, members = fit
        cfg: SparseConfig = self.config
        fewer_than_siblings = members - int(cfg.include_parent) < cfg.siblings and "partition" not in given
        self.configure(last_layers=layers, members=members, **({"partition": 1} if fewer_than_siblings else {}))
        where = "every layer" if layers is None else f"the last {layers} layer(s), the rest shared"
        return [f"--inference-budget {budget:g}: sparse tunes {where} in {members} members"]

    def build(self, ctx: BoostContext) -> Ensemble | None:
        cfg: SparseConfig = self.config
        parent = ctx.parent.eval()
        names = prunable_tensors(parent, cfg) if cfg.keep < 1 else []
        p = cfg.siblings
        ctx.note("budget_parent_epochs", cfg.parent_epochs)
        ctx.note(
            "masks",
            {
                "seed": cfg.seed,
                "keep": cfg.keep,
                "partition": p,
                "tensors": len(names),
                "elements": int(sum(parent.get_parameter(n).numel() for n in names)),
            },
        )
        ctx.log(
            f"training budget: {cfg.children} children x {cfg.child_epochs:g} epochs = {cfg.parent_epochs:g} parent-epochs "
            f"(keep {cfg.keep:g}" + (f", {p} partitioned siblings per mask" if p > 1 else "") + ")"
        )

        def tune(index: int) -> tuple:  # child `index` depends on (seed, index) alone: any process tunes it the same
            clock = Stopwatch()
            group, sibling = divmod(index, p)
            child_mask = group_masks(parent, names, cfg, group)[sibling] if names else None
            model, summary = tune_child(parent, child_mask, cfg, ctx, index)
            (logits,), select_y = cache_outputs([lambda x, m=model: (m(x),)], ctx.select_loader(256), ctx.device)
            summary["select"] = {k: round(v, 4) for k, v in scores(logits[0], select_y).items()}
            name = f"child-{index}" if p == 1 else f"g{group}s{sibling}"
            line = (
                f"{name}: select top-1 {summary['select']['top1']:.2f}% NLL {summary['select']['nll']:.4f} "
                f"({clock.seconds:.0f} s, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f})"
            )
            ctx.log(line)
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            return name, summary, logits[0], select_y, state, line

        # each process tunes its block of the children; rank 0 gets them all
        tuned = distributed.map_shards(tune, range(cfg.children), main_only=True)
        if tuned is None:
            return None
        mine = distributed.shard(cfg.children)
        for index, (*_, line) in enumerate(tuned):
            if index not in mine:  # tuned by another process, which does not print
                ctx.log(line)
        names_out = [t[0] for t in tuned]
        summaries = {t[0]: t[1] for t in tuned}
        select_logits = [t[2] for t in tuned]
        ctx.note("children", summaries)
        ctx.note("child_disagreement", round(mean_disagreement(select_logits), 3))
        if cfg.couple:
            return self._coupled([_child(parent, t[4]) for t in tuned], names_out, cfg, ctx)
        state_dicts = ([{k: v.detach().cpu() for k, v in parent.state_dict().items()}] if cfg.include_parent else []) + [
            t[4] for t in tuned
        ]
        member_names = (["parent"] if cfg.include_parent else []) + names_out
        group = MemberGroup.from_state_dicts(timm_config(parent), state_dicts, member_names)
        return Ensemble(groups=[group], combine=Combine(rule="prob_mean"))

    @staticmethod
    def _coupled(children: list[nn.Module], names: list[str], cfg: SparseConfig, ctx: BoostContext) -> Ensemble:
        """A SuperNet coupling layer over the children's features (:func:`posthoc.methods.supernet.couple`)."""
        nets = [FeaturesAndLogits(m).eval() for m in children]
        fns = [lambda x, net=net: (net(x)[0],) for net in nets]
        loader = ctx.train_loader(256, shuffle=False, seed=cfg.seed, augment="none")
        train, train_y = cache_outputs(
            fns, loader, ctx.device, show_progress=ctx.show_progress, description="children's features"
        )
        sel, sel_y = cache_outputs(fns, ctx.select_loader(256), ctx.device)
        return couple(
            children, names, [t[0] for t in train], train_y, [s[0] for s in sel], sel_y, cfg, ctx, batch_size=cfg.batch_size
        )
