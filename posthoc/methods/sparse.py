"""``sparse``: children tuned from the parent: Sparse Subnetwork Ensembles, prune and tune (Whitaker 2023,
ch. 5-6), and its dense, diverse and trajectory variants.

One concept: every member but the parent is a *child*, a copy of the parent tuned briefly on the
training split with a high-rate one-cycle schedule, which pushes it out of the parent's basin; the
children (and the parent with ``--include-parent``) are averaged as probabilities, or coupled by a
trained SuperNet layer (``--couple``).

What varies is how a child differs from its siblings:

- **a pruned subnetwork** (the thesis): a random subset of its conv and linear weights pruned
  (``--keep`` of them kept, layerwise). ``--keep 1.0`` prunes nothing: the children are only re-tuned
  (the dense ablation, the default).
- **its own training problem** (``--child-diversity``, :mod:`posthoc.methods._children`): ``hyper``
  draws each child's label smoothing, weight decay and augmentation strength (Wenzel et al. 2020,
  hyper-deep ensembles); ``classweights`` weights each child's cross-entropy by random class weights
  (Franchi et al. 2024). Children re-tuned from one checkpoint stay in its basin and give about half a
  deep ensemble's gain, no more than test-time flips (``--tta``) or longer training; each member must buy
  diversity with its training epochs. Combines with every other option.
- **its place on a trajectory** (``--schedule trajectory``; Garipov et al. 2018 FGE, Huang et al. 2017
  snapshot ensembles): child i starts from child i-1's end weights (child 0 from the parent), each a
  one-cycle segment of ``--child-epochs``, one member per cycle end. A trajectory of one cycle is the
  independent child 0 exactly. It is sequential: under torchrun rank 0 tunes every cycle and the other
  processes wait. Our choice where the papers differ: each segment is a fresh one-cycle run (fresh
  optimizer state), the thesis's child recipe, rather than one continuous cyclic run.

Defaults: the parent and one dense child (``--keep 1.0``) tuned for four epochs: 4 parent-epochs of
training, 2x the parent's inference (4x with the mirror view that ``--tta auto`` adds where it helps).
Chosen on the select part of the converged parent (``benchmarks/results/sparse_sweep_35ep.md``): every
4-epoch configuration (parent + 1 child x 4, parent + 2 children x 2, at max-lr 0.02 or 0.05)
scored within the split's noise (85.7-86.5 top-1, 0.413-0.417 NLL on 1,000 images), so the one
with the fewest members wins; for 2 and 6 parent-epochs, ``--child-epochs 2`` and ``--members 3
--child-epochs 3``. (On the 15-epoch parents two children of two epochs were chosen:
``sparse_select.md``.) Any pruning option (``--partition``, ``--anneal``,
``--structure``, ...) given without ``--keep`` prunes half the weights, the thesis's recipe.

Two first-class configurations for a budget of twice the parent:

- ``--members 2 --include-parent``: the parent and one child (2x the parent's inference cost);
- ``--members 1 --no-include-parent --child-epochs N``: the parent fine-tuned as one network for N
  epochs, the benchmark's "train longer" peer (1x inference, N epochs of training).

**Optimizer** (:func:`posthoc.training.fine_tune_recipe`, the rule every fine-tuning method shares):
``--optimizer auto`` is SGD with Nesterov momentum for a BatchNorm network (its rates were chosen on
CIFAR ResNets) and AdamW for any other (ViT, ConvNeXt and other LayerNorm networks, which timm
fine-tunes with AdamW): ``--max-lr`` defaults to 0.05 with SGD and 2e-4 with AdamW, ``--weight-decay``
to 5e-4 and 0.05 (decoupled, none on biases, norms and position embeddings). The rule is recorded in
the artifact (measured ``optimizer``).

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
- **BatchNorm** statistics are re-estimated for every child after tuning (``--bn-batches``; every
  trajectory member too), and the combination is softmax-then-mean (the thesis's stated rule; its
  pseudo-code's parent member is ``--include-parent``). A network without BatchNorm has nothing to
  re-estimate (LayerNorm normalizes each input by itself).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import distributed
from ..ensemble import Combine, Ensemble, MemberGroup
from ..errors import PosthocError
from ..graph import FeaturesAndLogits
from ..metrics import mean_disagreement, scores
from ..options import option
from ..runtime import seeded_generator
from ..timm_io import last_layers, timm_config
from ..training import FINE_TUNE_RATES, OPTIMIZERS, cache_outputs, fine_tune_recipe
from ._children import DIVERSITY, LABEL_SMOOTHING, WEIGHT_DECAY_FACTOR, ChildMask, ranges, tune_child
from ._coupling import CouplingConfig, couple
from .base import BoostContext, Method, Stopwatch
from .registry import register

RATES = FINE_TUNE_RATES["sparse"]


@dataclass
class SparseConfig(CouplingConfig):
    members: int = option(2, "Members of the artifact: the children, plus the parent with --include-parent.", ge=1)
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
        "Learning rate per batch: onecycle (warm-up to --max-lr, cosine down), constant (--max-lr throughout), or "
        "trajectory (one-cycle segments chained: child i starts from child i-1's end weights; sequential, on rank 0).",
        choices=("onecycle", "constant", "trajectory"),
    )
    optimizer: str = option(
        "auto",
        "Optimizer of the tuning: auto (SGD Nesterov for a BatchNorm network, AdamW for any other), sgd or adamw.",
        choices=OPTIMIZERS,
    )
    max_lr: float | None = option(None, f"Peak learning rate of each child's tuning (default: {RATES.describe('lr')}).", gt=0)
    pct_start: float = option(0.1, "Fraction of the tuning spent warming up (onecycle).", gt=0, lt=1)
    div_factor: float = option(100.0, "Initial learning rate = max-lr / div-factor (onecycle).", gt=0)
    final_div_factor: float = option(1e4, "Final learning rate = initial / final-div-factor (onecycle).", gt=0)
    momentum: float = option(
        0.9,
        "SGD momentum (Nesterov) with --schedule constant; onecycle cycles it between 0.85 and 0.95 (AdamW: betas 0.9, 0.999).",
        ge=0,
        lt=1,
    )
    weight_decay: float | None = option(
        None, f"Weight decay (default: {RATES.describe('weight_decay')}, decoupled, not on biases and norms).", ge=0
    )
    child_diversity: str = option(
        "none",
        "Each child's own training problem: none; hyper (its own label smoothing U[{:g}, {:g}], weight decay x a "
        "log-uniform factor in [{:g}, {:g}], light pad-crop of U[1/16, 1/4] of the side or timm min crop area "
        "U[0.08, 0.5]); or classweights (its cross-entropy weights classes by C x Dirichlet(--class-weight-concentration)).".format(
            *LABEL_SMOOTHING, *WEIGHT_DECAY_FACTOR
        ),
        choices=DIVERSITY,
    )
    class_weight_concentration: float = option(
        10.0,
        "Dirichlet concentration of --child-diversity classweights: class weights have mean 1 and spread ~1/sqrt(this).",
        gt=0,
    )
    child_epochs: float = option(4.0, "Epochs of tuning per child over the training split (fractions allowed).", gt=0)
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
        if self.schedule == "trajectory" and self.keep < 1:
            raise PosthocError(
                f"--schedule trajectory chains dense children (each starts from the previous one's weights); it cannot "
                f"prune (--keep {self.keep:g}): use --keep 1.0 and no pruning option"
            )
        concentration = type(self).__dataclass_fields__["class_weight_concentration"].default
        if self.class_weight_concentration != concentration and self.child_diversity != "classweights":
            raise PosthocError(
                "--class-weight-concentration shapes --child-diversity classweights; add it or drop the concentration"
            )


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


def _child(parent: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    """A tuned child back as a module (children travel between processes as state dicts)."""
    model = copy.deepcopy(parent)
    model.load_state_dict(state)
    return model.eval()


# ------------------------------------------------------------------------------------ the method
@register
class Sparse(Method):
    name = "sparse"
    Config = SparseConfig
    summary = (
        "Children tuned briefly from the parent (one-cycle): random pruned subnetworks (partitioned masks), each with its "
        "own hyper-parameters or class weights, or chained as a trajectory."
    )

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
        recipe = fine_tune_recipe(parent, RATES, cfg.optimizer, cfg.max_lr, cfg.weight_decay)
        trajectory = cfg.schedule == "trajectory"
        ctx.note("budget_parent_epochs", cfg.parent_epochs)
        ctx.note("optimizer", recipe.record())
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
        if cfg.child_diversity != "none":
            ctx.note("diversity", {"kind": cfg.child_diversity, **self._diversity_record(cfg)})
        ctx.log(
            f"training budget: {cfg.children} children x {cfg.child_epochs:g} epochs = {cfg.parent_epochs:g} parent-epochs "
            f"(keep {cfg.keep:g}" + (f", {p} partitioned siblings per mask" if p > 1 else "") + ")"
        )
        ctx.log(f"optimizer: {recipe.optimizer}, peak rate {recipe.lr:g}, weight decay {recipe.weight_decay:g} ({recipe.reason})")

        def tune(index: int, start: nn.Module = parent) -> tuple:
            # child `index` depends on (seed, index) and its start alone: any process tunes it the same
            clock = Stopwatch()
            group, sibling = divmod(index, p)
            child_mask = group_masks(parent, names, cfg, group)[sibling] if names else None
            model, summary = tune_child(start, child_mask, cfg, ctx, index, recipe)
            (logits,), select_y = cache_outputs([lambda x, m=model: (m(x),)], ctx.select_loader(256), ctx.device)
            summary["select"] = {k: round(v, 4) for k, v in scores(logits[0], select_y).items()}
            name = f"cycle-{index}" if trajectory else f"child-{index}" if p == 1 else f"g{group}s{sibling}"
            line = (
                f"{name}: select top-1 {summary['select']['top1']:.2f}% NLL {summary['select']['nll']:.4f} "
                f"({clock.seconds:.0f} s, loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f})"
            )
            ctx.log(line)
            state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
            return name, summary, logits[0], select_y, state, line, model

        if trajectory:  # sequential: rank 0 tunes every cycle, the other processes wait (boost's barrier)
            if not distributed.is_main():
                return None
            tuned, start = [], parent
            for index in range(cfg.children):
                *result, start = tune(index, start)  # the next cycle starts from this cycle's end
                tuned.append(tuple(result))
        else:  # each process tunes its block of the children; rank 0 gets them all
            tuned = distributed.map_shards(lambda i: tune(i)[:-1], range(cfg.children), main_only=True)
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
    def _diversity_record(cfg: SparseConfig) -> dict[str, Any]:
        """The declared ranges of ``--child-diversity`` (the draws themselves are in each child's summary)."""
        if cfg.child_diversity == "classweights":
            return {"class_weights": f"C x Dirichlet({cfg.class_weight_concentration:g})"}
        return {"ranges": ranges()}

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
