"""``noisy``: Noisy Subnetwork Ensembles (Whitaker 2023, ch. 4), no training at all.

Children are sparse Gaussian mutations of the parent, ``W + N * M`` with a Bernoulli mask ``M`` of
density ``density`` and ``N ~ N(0, sigma^2)`` per tensor (eq. 4.1-4.3); one draw of ``(M, N)`` gives
four children, ``W +/- N*M`` and ``W +/- N*(1-M)`` (mirrored and partitioned draws, eq. 4.6-4.11). The
best children on the select part are kept.

Choices where the thesis is silent or inconsistent:

- sigma is bisected on log sigma to hit a target KL(parent || child) with common random numbers,
  where the thesis grid-searches it; ``density`` is the fraction of weights perturbed;
- conv and linear weights are mutated (biases and norms are options), only in the last
  ``--last-layers`` layers when given, so the artifact shares and computes the trunk once;
- softmax-then-mean combination (the thesis's stated rule); its pseudo-code's parent member is
  ``--include-parent``;
- each child's BatchNorm statistics in the mutated scope are re-estimated on training images
  (``--bn-batches``; 0 keeps the parent's), which the thesis does not do.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn
from torch.func import functional_call

from .. import distributed
from ..ensemble import Combine, Ensemble, MemberGroup
from ..errors import PosthocError
from ..graph import FeaturesAndLogits, split_shared_prefix
from ..options import Renamed, option
from ..runtime import progress, seeded_generator
from ..timm_io import last_layers, timm_config
from ..training import ImageBatches, has_batchnorm, materialize, recalibrate_bn
from .base import BoostContext, Method, MethodConfig
from .registry import register


@dataclass
class NoisyConfig(MethodConfig):
    renamed: ClassVar[dict[str, Renamed]] = {
        "scope": Renamed("last_layers", lambda v: None if v is None else v + 1, "the classifier counts as layer 1"),
        "bn_recalibrate": Renamed(
            "bn_batches", lambda on: None if on else 0, "0 keeps the parent's statistics in every child", kind=bool
        ),
    }

    members: int = option(
        9, "Members of the artifact: the best children of the population, plus the parent with --include-parent.", ge=1
    )
    population: int = option(16, "Children generated and scored; a multiple of 4 uses whole mirrored/partitioned draws.", ge=1)
    density: float = option(0.5, "Fraction of each tensor's weights perturbed (mask density).", gt=0, le=1)
    target_kl: float = option(0.05, "Target mean KL(parent || child) on the KL samples; sigma is searched to hit it.", gt=0)
    sigma: float | None = option(None, "Fixed noise scale instead of the KL search.", gt=0)
    noise: str = option(
        "absolute",
        "absolute (sigma is the std) or relative (sigma times each tensor's weight std).",
        choices=("absolute", "relative"),
    )
    kl_samples: int = option(1000, "Validation (select) images used for the sigma search.", ge=1)
    kl_tolerance: float = option(0.05, "Relative tolerance of the KL search.", gt=0)
    fitness: str = option(
        "accuracy", "Selection score on the select split: accuracy (ties by NLL) or nll.", choices=("accuracy", "nll")
    )
    include_parent: bool = option(True, "Make the unmodified parent one of the members.")
    antithetic: bool = option(True, "Mirrored + partitioned draws: 4 children per (M, N) draw.")
    mutate_biases: bool = option(False, "Also perturb biases.")
    mutate_norm: bool = option(False, "Also perturb normalization weights and biases.")
    last_layers: int | None = option(
        None, "Mutate only the last N layers: 1 = the classifier, 2 = also the last block, ... (default: all).", ge=1
    )
    bn_batches: int = option(
        32,
        "Training batches (of 128, eval transform) re-estimating each child's BatchNorm; 0 keeps the parent's statistics.",
        ge=0,
    )

    @property
    def children(self) -> int:
        """Children kept: every member but the parent."""
        return self.members - int(self.include_parent)

    def validate(self) -> None:
        if self.children < 1 or self.population < self.children:
            raise PosthocError(
                f"--members {self.members} keeps {self.children} children (the parent is a member too with --include-parent), "
                f"which must be between 1 and --population {self.population}"
            )


# ------------------------------------------------------------------------------------ mutation
def mutable_tensors(model: nn.Module, biases: bool = False, norm: bool = False, layers: int | None = None) -> list[str]:
    """Names of the tensors a child perturbs, in the model's order.

    Conv and linear weights always; biases and normalization parameters when asked. ``layers`` keeps
    only the last ``layers`` layers (:func:`posthoc.timm_io.last_layers`: 1 = the classifier).
    """
    norm_types = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm)
    names = []
    for mod_name, module in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            names.append(prefix + "weight")
            if biases and module.bias is not None:
                names.append(prefix + "bias")
        elif norm and isinstance(module, norm_types):
            names += [prefix + n for n, p in module.named_parameters(recurse=False) if p is not None]
    if layers is not None:
        allowed = {name for group in last_layers(model, layers) for name in group}
        names = [n for n in names if n in allowed]
    if not names:
        raise PosthocError("no tensors to mutate in the chosen --last-layers; widen it or mutate biases/norms")
    return names


@dataclass(frozen=True)
class Child:
    """Child ``draw`` of the population: W + sign * sigma * Z * mask (mask or its complement)."""

    draw: int
    sign: int
    complement: bool

    @property
    def name(self) -> str:
        return f"d{self.draw}{'+' if self.sign > 0 else '-'}{'~M' if self.complement else 'M'}"


def population_plan(size: int, antithetic: bool) -> list[Child]:
    """Children in generation order: 4 per draw when antithetic, else one per draw."""
    if not antithetic:
        return [Child(d, 1, False) for d in range(size)]
    pattern = [(1, False), (1, True), (-1, False), (-1, True)]
    return [Child(i // 4, *pattern[i % 4]) for i in range(size)]


class Mutator:
    """Generates children of one parent from seeded unit draws (nothing large is stored)."""

    def __init__(self, parent: nn.Module, names: list[str], density: float, noise: str, seed: int):
        params = dict(parent.named_parameters())
        self.base = {n: params[n].detach() for n in names}
        self.scale = {n: (w.float().std().item() if noise == "relative" and w.numel() > 1 else 1.0) for n, w in self.base.items()}
        self.density = density
        self.seed = seed
        self._cache: tuple[int, dict] | None = None

    def unit_draw(self, draw: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """(Z, M) per tensor for draw ``draw``: Z ~ N(0, 1), M ~ Bernoulli(density), seeded by (seed, draw)."""
        if self._cache is not None and self._cache[0] == draw:
            return self._cache[1]
        gen = seeded_generator(self.seed, draw)
        out = {}
        for name, w in self.base.items():
            z = torch.randn(w.shape, generator=gen, dtype=torch.float32)
            m = torch.rand(w.shape, generator=gen) < self.density
            out[name] = (z.to(w.device, w.dtype), m.to(w.device))
        self._cache = (draw, out)
        return out

    def child(self, spec: Child, sigma: float) -> dict[str, torch.Tensor]:
        """The mutated tensors of child ``spec`` at noise scale ``sigma``."""
        draws = self.unit_draw(spec.draw)
        out = {}
        for name, w in self.base.items():
            z, m = draws[name]
            mask = ~m if spec.complement else m
            out[name] = w + (spec.sign * sigma * self.scale[name]) * z * mask
        return out


# ------------------------------------------------------------------------------------ evaluation
class ChildScorer:
    """Scores children on cached data, running only the part downstream of the mutated tensors."""

    def __init__(
        self, parent: nn.Module, names: list[str], x: torch.Tensor, y: torch.Tensor, device: torch.device, batch: int = 500
    ):
        self.net = FeaturesAndLogits(parent).eval()
        prefix, suffix, outputs, nb = split_shared_prefix(self.net, {f"model.{n}" for n in names})
        self.y = y
        self.batch = batch
        self.device = device
        self.fn = suffix if suffix is not None else self.net
        self.logit_index = outputs[1][1] if suffix is not None else 1
        with torch.no_grad():
            if prefix is not None:
                self.inputs = [tuple(t.detach() for t in prefix(xb.to(device))[:nb]) for xb in x.split(batch)]
            else:
                self.inputs = [(xb.to(device),) for xb in x.split(batch)]
        self.batched = _from_images(prefix)[:nb] if prefix is not None else [True]
        self.parent_logits = self.logits({})

    def head(self, n: int) -> ChildScorer:
        """A scorer over the first ``n`` cached images, sharing this one's trace and prefix activations."""
        other = copy.copy(self)
        other.inputs, left = [], n
        for args in self.inputs:
            if left <= 0:
                break
            b = next(a.shape[0] for a, batched in zip(args, self.batched) if batched)
            cut = lambda a, batched: a[:left] if batched else a  # a norm's weight may be as long as the batch
            other.inputs.append(tuple(cut(a, batched) for a, batched in zip(args, self.batched)) if b > left else args)
            left -= b
        other.y, other.parent_logits = self.y[:n], self.parent_logits[:n]
        return other

    @torch.no_grad()
    def logits(
        self, tensors: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor] | None = None, *, shard: bool = False
    ) -> torch.Tensor:
        """Logits (N, C) of the parent with ``tensors`` (and BN ``buffers``) replaced. With ``shard``, the
        cached batches are split among processes and the logits gathered: the same logits, bit for bit."""
        params = {f"model.{n}": t for n, t in {**tensors, **(buffers or {})}.items()}

        def batch_logits(args: tuple) -> torch.Tensor:
            out = functional_call(self.fn, params, args) if params else self.fn(*args)
            return out[self.logit_index].float().cpu()

        outs = distributed.map_shards(batch_logits, self.inputs) if shard else [batch_logits(a) for a in self.inputs]
        return torch.cat(outs)


def _from_images(prefix: torch.fx.GraphModule) -> list[bool]:
    """Which outputs of a traced prefix depend on its input images (one row per image), rather than on
    parameters alone."""
    seen: set = set()
    for node in prefix.graph.nodes:
        if node.op == "placeholder" or any(a in seen for a in node.all_input_nodes):
            seen.add(node)
    output = next(n for n in prefix.graph.nodes if n.op == "output").args[0]
    return [n in seen for n in (output if isinstance(output, (tuple, list)) else [output])]


def kl_to_parent(parent_logits: torch.Tensor, child_logits: torch.Tensor) -> float:
    """Mean KL(parent || child) of the softmax outputs (thesis eq. 4.5)."""
    p_log = parent_logits.log_softmax(-1)
    q_log = child_logits.log_softmax(-1)
    return float((p_log.exp() * (p_log - q_log)).sum(-1).mean())


def search_sigma(
    kl_at: callable, target: float, start: float, tolerance: float = 0.05, max_steps: int = 40
) -> tuple[float, float, list[tuple[float, float]]]:
    """Find sigma with ``kl_at(sigma)`` within ``tolerance`` (relative) of ``target``.

    Brackets the target by doubling / halving ``start``, then bisects on log sigma. Returns
    ``(sigma, kl, trace)``, the last evaluated point closest to the target and every (sigma, kl) tried.
    """
    trace: list[tuple[float, float]] = []

    def f(s: float) -> float:
        kl = kl_at(s)
        trace.append((s, kl))
        return kl

    lo = hi = start
    kl = f(start)
    if abs(kl / target - 1) <= tolerance:
        return start, kl, trace
    if kl < target:
        while kl < target and len(trace) < max_steps:
            lo, hi = hi, hi * 2.0
            kl = f(hi)
    else:
        while kl > target and len(trace) < max_steps:
            hi, lo = lo, lo / 2.0
            kl = f(lo)
    if abs(kl / target - 1) <= tolerance:
        return trace[-1][0], kl, trace
    while len(trace) < max_steps:
        mid = math.sqrt(lo * hi)
        kl = f(mid)
        if abs(kl / target - 1) <= tolerance:
            break
        if kl < target:
            lo = mid
        else:
            hi = mid
    best = min(trace, key=lambda t: abs(math.log(max(t[1], 1e-30) / target)))
    return best[0], best[1], trace


# ------------------------------------------------------------------------------------ the method
@register
class Noisy(Method):
    name = "noisy"
    Config = NoisyConfig
    summary = "Sparse Gaussian mutations of the parent at a target KL, top-K children by validation; no training."

    def fit_budget(self, parents: list[nn.Module], budget: float, given: set[str]) -> list[str]:
        """The widest mutated part (``--last-layers``) at which at least 4 members fit, with as many
        members (up to ``--members``) as fit; an explicit ``--last-layers`` or ``--members`` is kept."""
        fit = self.fit_width_and_members(parents, budget, given)
        if fit is None:
            return [f"--members and --last-layers were given: they override --inference-budget {budget:g}"]
        layers, members = fit
        self.configure(last_layers=layers, members=members)
        where = "every layer" if layers is None else f"the last {layers} layer(s)"
        return [f"--inference-budget {budget:g}: noisy mutates {where} with {members} members"]

    def build(self, ctx: BoostContext) -> Ensemble | None:
        cfg: NoisyConfig = self.config
        parent = ctx.parent.eval()
        names = mutable_tensors(parent, cfg.mutate_biases, cfg.mutate_norm, cfg.last_layers)
        ctx.note("mutated_tensors", len(names))
        ctx.note("mutated_elements", int(sum(parent.get_parameter(n).numel() for n in names)))
        mutator = Mutator(parent, names, cfg.density, cfg.noise, cfg.seed)
        x, y = materialize(ctx.select_loader(256))
        kl_n = min(cfg.kl_samples, len(y))
        # the sigma search uses the first kl_samples select images; selection scores all of them
        scorer = ChildScorer(parent, names, x, y, ctx.device)
        kl_scorer = scorer.head(kl_n)
        del x

        if cfg.sigma is not None:
            sigma = cfg.sigma
            kl = self._mean_kl(kl_scorer, mutator, sigma)
        else:
            search_children = (Child(0, 1, False), Child(0, 1, True))
            start = 0.1 if cfg.noise == "relative" else 1e-3

            def kl_at(s: float) -> float:
                return self._mean_kl(kl_scorer, mutator, s, search_children)

            ctx.log(f"searching the noise scale for KL(parent||child) = {cfg.target_kl:g} on {kl_n} select images ...")
            sigma, kl, trace = search_sigma(kl_at, cfg.target_kl, start, cfg.kl_tolerance)
            ctx.note("sigma_search", [[round(s, 8), round(k, 6)] for s, k in trace])
        ctx.note("sigma", sigma)
        ctx.note("kl", kl)
        ctx.log(f"noise scale sigma={sigma:.4g} gives mean KL(parent||child)={kl:.4f} on {kl_n} images")

        bn_loader = None
        if cfg.bn_batches and has_batchnorm(parent):
            bn_loader = ImageBatches(lambda: ctx.train_loader(128, seed=cfg.seed, augment="none"), cfg.bn_batches)

        def score(spec: Child) -> tuple:  # depends on the child alone: any process scores it the same
            tensors = mutator.child(spec, sigma)
            buffers = self._recalibrated_buffers(parent, tensors, names, bn_loader, ctx.device) if bn_loader is not None else {}
            logits = scorer.logits(tensors, buffers)
            acc = float((logits.argmax(-1) == y).float().mean())
            nll = float(torch.nn.functional.cross_entropy(logits, y))
            key = (-acc, nll) if cfg.fitness == "accuracy" else (nll, -acc)
            return key, spec, {k: v.cpu() for k, v in buffers.items()}, acc, nll

        # each process scores its block of the population on the whole select part; all get every score
        scored = distributed.map_shards(
            score,
            population_plan(cfg.population, cfg.antithetic),
            loop=lambda specs: progress(specs, description="children", enabled=ctx.show_progress),
        )
        scored.sort(key=lambda t: t[0])
        chosen = scored[: cfg.children]
        ctx.note("population", [{"child": s.name, "top1": round(100 * a, 3), "nll": round(nll, 5)} for _, s, _, a, nll in scored])
        ctx.note("selected", [s.name for _, s, *_ in chosen])

        base = {k: v.detach() for k, v in parent.state_dict().items()}
        state_dicts, member_names = [], []
        if cfg.include_parent:
            state_dicts.append(base)
            member_names.append("parent")
        for _, spec, buffers, *_ in chosen:
            sd = dict(base)
            sd.update(mutator.child(spec, sigma))
            sd.update(buffers)
            state_dicts.append(sd)
            member_names.append(spec.name)
        group = MemberGroup.from_state_dicts(
            timm_config(parent), [{k: v.cpu() for k, v in sd.items()} for sd in state_dicts], member_names
        )
        return Ensemble(groups=[group], combine=Combine(rule="prob_mean"))

    @staticmethod
    def _mean_kl(scorer: ChildScorer, mutator: Mutator, sigma: float, children=(Child(0, 1, False), Child(0, 1, True))) -> float:
        """Mean KL(parent || child) over ``children``; the KL images' batches are split among processes."""
        kls = [kl_to_parent(scorer.parent_logits, scorer.logits(mutator.child(c, sigma), shard=True)) for c in children]
        return sum(kls) / len(children)

    @staticmethod
    def _recalibrated_buffers(parent, tensors, names, loader, device) -> dict[str, torch.Tensor]:
        """BatchNorm statistics of the child, re-estimated on training images, for BN layers in scope."""
        child = copy.deepcopy(parent)
        with torch.no_grad():
            for n, t in tensors.items():
                child.get_parameter(n).copy_(t)
        first = min(list(dict(parent.named_parameters())).index(n) for n in names)
        order = list(dict(parent.named_parameters()))
        in_scope = {n.rsplit(".", 1)[0] for n in order[first:]}
        bns = [m for n, m in child.named_modules() if n in in_scope and isinstance(m, nn.modules.batchnorm._BatchNorm)]
        recalibrate_bn(child, loader, device, modules=bns)
        out = {}
        for name, module in child.named_modules():
            if module in bns:
                out[f"{name}.running_mean"] = module.running_mean.detach().clone()
                out[f"{name}.running_var"] = module.running_var.detach().clone()
        return out
