"""``resample``: weight-parameter resampling (Liu et al. 2018, arXiv:1807.00847).

The parent is fine-tuned for about one epoch at a constant rate (SGD for a BatchNorm network, the paper's
setting; AdamW for any other, by the rule every fine-tune shares:
:func:`posthoc.training.fine_tune_recipe`); after every optimizer step a
Welford running mean and M2 of every trainable parameter are updated (paper eq. 2-3, the population
variance M2 / n). The statistics give the **mean model** (every parameter at its running mean: one
network with no inference overhead, the paper's "mean-resampled" model) and networks **drawn**
elementwise from N(mean, (std_scale * std)^2), averaged as probabilities. ``--members`` counts them
all; ``--include-mean`` makes the mean model one of them.

Choices where the paper is silent: every trainable parameter is tracked (buffers never are); the loss
is the batch *mean* cross-entropy (the paper writes a sum; its rates only make sense for a mean);
only post-update iterates are recorded; and, as SWA and SWAG do, every output network gets its
BatchNorm statistics re-estimated on training batches (``--bn-batches``), which the paper never
mentions. ``--save-stats`` / ``--stats`` keep the statistics in a safetensors file and re-draw from
them without fine-tuning again.
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from .. import distributed
from ..ensemble import Combine, Ensemble, MemberGroup
from ..errors import PosthocError, first_line
from ..options import Renamed, option
from ..paths import check_input_file, os_errors, public_mode, remove_stale_siblings, temporary_sibling
from ..runtime import progress, seeded_generator
from ..timm_io import check_finite, timm_config
from ..training import (
    FINE_TUNE_RATES,
    ImageBatches,
    Recipe,
    cache_outputs,
    cycle,
    fine_tune_optimizer,
    fine_tune_recipe,
    has_batchnorm,
    recalibrate_bn,
    train_steps,
)
from .base import BoostContext, Method, MethodConfig, Stopwatch
from .registry import register

STATS_DTYPES = {"float32": torch.float32, "float64": torch.float64}
STATS_FORMAT = "posthoc-welford"
RATES = FINE_TUNE_RATES["resample"]


@dataclass
class ResampleConfig(MethodConfig):
    renamed: ClassVar[dict[str, Renamed]] = {"scale": Renamed("std_scale")}

    epochs: float = option(1.0, "Fine-tune length in epochs over the training split (fractions allowed).", gt=0)
    optimizer: str = option(
        "auto",
        "Optimizer of the fine-tune: auto (SGD for a BatchNorm network, the paper's; AdamW for any other), sgd or adamw.",
        choices=("auto", "sgd", "adamw"),
    )
    lr: float | None = option(
        None, f"Constant learning rate of the fine-tune, batch-mean loss (default: {RATES.describe('lr')}).", gt=0
    )
    momentum: float = option(0.0, "SGD momentum (0: plain SGD, the paper's eq. 1; AdamW: betas 0.9, 0.999).", ge=0, lt=1)
    weight_decay: float | None = option(
        None, f"Weight decay during the fine-tune (default: {RATES.describe('weight_decay')}, decoupled).", ge=0
    )
    batch_size: int = option(128, "Fine-tune batch size per process (the paper's 128; N processes: N times it per step).", ge=1)
    augment: str = option(
        "light", "Fine-tune augmentation: light (pad-crop + flip), timm, or none.", choices=("light", "timm", "none")
    )
    burn_in: int = option(0, "Optimizer steps before the statistics start recording.", ge=0)
    every: int = option(1, "Record the weights every N optimizer steps after the burn-in (the paper: 1).", ge=1)
    members: int = option(
        1,
        "Members of the artifact: the mean model (with --include-mean) and networks drawn from N(mean, (std-scale*std)^2); "
        "the default, 1, is the mean model alone (why: benchmarks/results/defaults.md).",
        ge=1,
    )
    include_mean: bool = option(True, "Make the mean model one of the members.")
    std_scale: float = option(1.0, "Multiplier on the measured std when drawing members (the paper: 1).", gt=0)
    stats_dtype: str = option("float32", "Dtype of the Welford accumulators: float32 or float64.", choices=tuple(STATS_DTYPES))
    bn_batches: int = option(
        16,
        "Training batches (of 128, eval transform) re-estimating each network's BatchNorm; 0 keeps the fine-tuned statistics.",
        ge=0,
    )
    save_stats: str | None = option(
        None, "Write the Welford statistics (mean, M2, count) to this .safetensors file.", role="output"
    )
    stats: str | None = option(
        None, "Draw from statistics saved with --save-stats instead of fine-tuning (a .safetensors file).", role="input"
    )

    @property
    def draws(self) -> int:
        """Members drawn from the Gaussian: every member but the mean model."""
        return self.members - int(self.include_mean)

    @classmethod
    def upgrade(cls, values: dict, warn) -> dict:
        """``--members 0`` (the mean model alone, posthoc 0.1) is ``--members 1 --include-mean`` now."""
        if values.get("members") == 0:
            warn(
                "--members 0 is deprecated and goes away in the next release; the mean model alone is --members 1 --include-mean"
            )
            values = {**values, "members": 1, "include_mean": True}
        return values

    def validate(self) -> None:
        for flag_name, value in (("--save-stats", self.save_stats), ("--stats", self.stats)):
            if value is not None and not str(value).endswith(".safetensors"):
                raise PosthocError(f"{flag_name} must name a .safetensors file, got '{value}'")
        if self.stats is not None and self.save_stats is not None:
            raise PosthocError("--stats re-uses saved statistics and --save-stats writes new ones; give one of them")
        if self.stats is not None:
            check_input_file(self.stats, "statistics file", "write one with --save-stats first")


# ------------------------------------------------------------------------------------ statistics
class WelfordStats:
    """Running mean and M2 of named tensors (Welford 1962; the paper's eq. 2-3).

    ``update`` folds in snapshot ``n``: ``delta = x - mean; mean += delta / n; M2 += delta^2 (n-1) / n``
    (the paper's eq. 3 in M2 form; every term is a square, so M2 cannot go negative). ``var`` is the
    population variance ``M2 / n`` (divide by n, as eq. 3). Accumulators live on each tensor's device in
    ``dtype``; an update costs a few passes over the parameters.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32):
        self.dtype = dtype
        self.mean = {n: torch.zeros(t.shape, dtype=dtype, device=t.device) for n, t in tensors.items()}
        self.m2 = {n: torch.zeros(t.shape, dtype=dtype, device=t.device) for n, t in tensors.items()}
        self.count = 0

    @property
    def names(self) -> list[str]:
        return list(self.mean)

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Fold in one snapshot of every tracked tensor."""
        missing = [n for n in self.mean if n not in tensors]
        if missing:
            raise PosthocError(f"snapshot lacks tracked tensor '{missing[0]}'")
        self.count += 1
        n = self.count
        for name, mean in self.mean.items():
            delta = tensors[name].detach().to(self.dtype) - mean
            mean.add_(delta, alpha=1.0 / n)
            self.m2[name].addcmul_(delta, delta, value=(n - 1) / n)

    def _require(self, n: int = 1) -> None:
        if self.count < n:
            raise PosthocError(f"the statistics hold {self.count} snapshot(s); at least {n} needed")

    def var(self) -> dict[str, torch.Tensor]:
        """Population variance ``M2 / n`` per tensor (never negative; the clamp only guards loaded files)."""
        self._require()
        return {n: (m2 / self.count).clamp_min_(0) for n, m2 in self.m2.items()}

    def std(self) -> dict[str, torch.Tensor]:
        return {n: v.sqrt_() for n, v in self.var().items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """``mean.<name>``, ``m2.<name>`` and ``count``, contiguous and on CPU (for safetensors)."""
        out = {f"mean.{n}": t.detach().cpu().contiguous() for n, t in self.mean.items()}
        out.update({f"m2.{n}": t.detach().cpu().contiguous() for n, t in self.m2.items()})
        out["count"] = torch.tensor(self.count, dtype=torch.int64)
        return out

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore from :meth:`state_dict` (tensors move to the accumulators' devices)."""
        names = sorted(k[5:] for k in state if k.startswith("mean."))
        if sorted(self.mean) != names or any(f"m2.{n}" not in state for n in names) or "count" not in state:
            raise PosthocError("the statistics do not cover the same tensors as this model")
        for n in self.mean:
            for kind, store in (("mean", self.mean), ("m2", self.m2)):
                t = state[f"{kind}.{n}"]
                if tuple(t.shape) != tuple(store[n].shape):
                    raise PosthocError(
                        f"saved {kind} of '{n}' has shape {tuple(t.shape)}, the model's is {tuple(store[n].shape)}"
                    )
                store[n].copy_(t)
        count = state["count"]
        if count.numel() != 1 or count.is_floating_point() or int(count) < 0:
            raise PosthocError("the statistics' snapshot count is not a non-negative whole number; the file is damaged")
        self.count = int(count)

    def save(self, path: str | Path, metadata: Mapping[str, str] | None = None) -> Path:
        """Write the statistics as one .safetensors file (no pickles); ``metadata`` is stored alongside."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {
            "format": STATS_FORMAT,
            "version": "1",
            "count": str(self.count),
            "dtype": str(self.dtype).removeprefix("torch."),
            "names": json.dumps(self.names),
        }  # safetensors sorts its keys; this keeps the model's order
        meta.update({k: str(v) for k, v in (metadata or {}).items()})
        remove_stale_siblings(path)
        tmp = temporary_sibling(path)
        try:  # the parent is made only now, at the write itself; an interrupted run leaves no truncated file
            with os_errors(f"writing the statistics file {path}"):
                path.parent.mkdir(parents=True, exist_ok=True)
                save_file(self.state_dict(), str(tmp), metadata=dict(sorted(meta.items())))
                public_mode(tmp)
                os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu") -> tuple[WelfordStats, dict[str, str]]:
        """Read a file written by :meth:`save`; returns the statistics and the stored metadata."""
        from safetensors import SafetensorError, safe_open

        path = check_input_file(path, "statistics file", "write one with --save-stats first")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                state = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open is not iterable
        except (SafetensorError, OSError) as e:
            raise PosthocError(f"{path} is not a readable safetensors file ({first_line(e)})") from None
        if meta.get("format") != STATS_FORMAT:
            raise PosthocError(f"{path} does not hold resample statistics; write them with --save-stats")
        check_finite(state, f"statistics file {path}")
        dtype = STATS_DTYPES.get(meta.get("dtype", ""), torch.float32)
        shapes = {k[5:]: t for k, t in state.items() if k.startswith("mean.")}
        order = _json_field(meta, "names", [])
        if sorted(order) == sorted(shapes):
            shapes = {n: shapes[n] for n in order}
        stats = cls({n: torch.empty(t.shape, device=device) for n, t in shapes.items()}, dtype=dtype)
        stats.load_state_dict(state)
        return stats, meta


def _json_field(meta: Mapping[str, str], key: str, default):
    """A JSON field of a statistics file's metadata (``default`` when absent or not JSON)."""
    try:
        value = json.loads(meta.get(key, "null"))
    except ValueError:
        return default
    return value if isinstance(value, type(default)) else default


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every parameter with ``requires_grad``, in the model's order: what the paper tracks and resamples."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise PosthocError("the model has no trainable parameters to fine-tune and resample")
    return params


# ------------------------------------------------------------------------------------ fine-tune
def finetune_with_stats(
    model: nn.Module,
    loader: Iterable,
    steps: int,
    *,
    lr: float,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    burn_in: int = 0,
    every: int = 1,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    amp: bool = False,
    show_progress: bool = False,
    optimizer: str = "sgd",
) -> tuple[WelfordStats, dict[str, float]]:
    """Fine-tune ``model`` in place for ``steps`` steps and record the Welford statistics.

    Constant learning rate and batch-mean cross-entropy, model in train mode (the paper's fine-tuning
    stage), with ``optimizer`` ``sgd`` (classical momentum, the paper's) or ``adamw``
    (:func:`posthoc.training.fine_tune_optimizer`). Under torchrun the model trains as ``DistributedDataParallel`` on ``loader``'s share of every
    global batch (``make_loader(..., shard="split")``), and every process records the same statistics
    (the weights are identical after every step). After optimizer step ``s`` (1-based) the weights are
    recorded when ``s > burn_in`` and
    ``(s - burn_in) % every == 0``; the starting weights are not a sample. Returns the statistics and
    a summary (``steps``, ``snapshots``, ``first_loss``, ``last_loss``: mean loss of the first and last
    10% of the steps).
    """
    params = trainable_parameters(model)
    stats = WelfordStats(params, dtype)
    net = distributed.data_parallel(model, torch.device(device))  # the same weights on every process
    recipe = Recipe(optimizer, lr, weight_decay, "given")
    opt, _ = fine_tune_optimizer(model, steps, recipe, schedule="constant", momentum=momentum, nesterov=False)

    def record(step: int) -> None:
        if step > burn_in and (step - burn_in) % every == 0:
            stats.update(params)

    model.train()
    window = max(1, steps // 10)
    losses = train_steps(
        net,
        cycle(loader, steps),
        opt,
        steps=steps,
        after_step=record,
        device=torch.device(device),
        amp=amp,
        window=window,
        show_progress=show_progress,
        description="fine-tune",
    )
    model.eval()
    per_process = distributed.all_gather(losses)
    losses = [sum(step) / len(step) for step in zip(*per_process)]  # the global batch's loss
    summary = {
        "steps": len(losses),
        "snapshots": stats.count,
        "first_loss": sum(losses[:window]) / max(len(losses[:window]), 1),
        "last_loss": sum(losses[-window:]) / max(len(losses[-window:]), 1),
    }
    return stats, summary


# ------------------------------------------------------------------------------------ sampling
def mean_weights(stats: WelfordStats, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The running mean of every tracked tensor, in the dtype and on the device of ``like``."""
    return {n: m.to(device=like[n].device, dtype=like[n].dtype) for n, m in stats.mean.items()}


def draw_members(
    stats: WelfordStats, k: int, scale: float, seed: int, like: Mapping[str, torch.Tensor] | None = None
) -> list[dict[str, torch.Tensor]]:
    """``k`` draws ``mean + scale * std * z``, ``z ~ N(0, 1)`` elementwise (the paper's diagonal Gaussian).

    Draw ``j`` uses a CPU generator seeded with ``(seed, j)`` and consumes the tensors in the model's
    order, so the same seed gives the same members on any device, and member ``j`` does not depend on
    ``k``. Results take the dtype and device of ``like`` (default: the accumulators').
    """
    return list(iter_members(stats, k, scale, seed, like))


def iter_members(
    stats: WelfordStats, k: int, scale: float, seed: int, like: Mapping[str, torch.Tensor] | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """:func:`draw_members` one member at a time (only one draw in memory)."""
    std = stats.std()
    for j in range(k):
        yield draw_member(stats, std, j, scale, seed, like)


def draw_member(
    stats: WelfordStats,
    std: Mapping[str, torch.Tensor],
    j: int,
    scale: float,
    seed: int,
    like: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Draw ``j`` of :func:`draw_members` (``std`` is ``stats.std()``): it depends on ``(seed, j)`` alone."""
    gen = seeded_generator(seed, j)
    member = {}
    for name, mean in stats.mean.items():
        z = torch.randn(mean.shape, generator=gen, dtype=torch.float32).to(mean.device, mean.dtype)
        w = mean + scale * std[name] * z
        ref = like[name] if like is not None else mean
        member[name] = w.to(device=ref.device, dtype=ref.dtype)
    return member


def bn_statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the BatchNorm running statistics (mean, var, batches tracked) of ``model``."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for buf_name, buf in module.named_buffers(recurse=False):
                if buf is not None:
                    out[f"{name}.{buf_name}"] = buf.detach().clone()
    return out


# ------------------------------------------------------------------------------------ the method
@register
class Resample(Method):
    name = "resample"
    Config = ResampleConfig
    summary = "Fine-tune ~1 epoch with constant-rate SGD, keep a Welford mean/std per weight; mean model or Gaussian draws."

    candidates: list[tuple[bool, int]] | None = None  # (mean model included, members) to choose from on select

    @classmethod
    def wrote(cls, path: Path) -> bool:
        """A statistics file written by ``--save-stats`` (a rerun replaces it; any other file is kept)."""
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                return (f.metadata() or {}).get("format") == STATS_FORMAT
        except (SafetensorError, OSError, ValueError):
            return False

    def fit_budget(self, parents: list[nn.Module], budget: float, given: set[str]) -> list[str]:
        """Every member is a full network: under 2x the mean model alone; otherwise the mean model, K draws,
        or the mean and K-1 draws (K the most full networks that fit, at most 8), chosen on the select part."""
        if "members" in given:
            return [f"--members was given: it overrides --inference-budget {budget:g}"]
        k = min(8, int(budget + 1e-9))
        if k < 2:
            self.configure(members=1, include_mean=True)
            return [f"--inference-budget {budget:g}: resample writes the mean model (1.00x)"]
        self.candidates = [(True, 1), (False, k), (True, k)]
        self.configure(members=k + 1, include_mean=True)  # the mean and k draws cover every candidate
        return [
            f"--inference-budget {budget:g}: resample chooses on the select part between the mean model, {k} draws "
            f"and the mean with {k - 1} draws"
        ]

    def build(self, ctx: BoostContext) -> Ensemble | None:
        cfg: ResampleConfig = self.config
        parent = ctx.parent.eval()
        model = copy.deepcopy(parent)  # the parent itself stays untouched
        params = trainable_parameters(model)
        arch = timm_config(parent)

        if cfg.stats is not None:
            stats, meta = WelfordStats.load(cfg.stats, device=ctx.device)
            self._check_stats(stats, params, meta, arch, cfg.stats)
            ctx.note("stats_from", str(cfg.stats))
            ctx.note("finetune", _json_field(meta, "finetune", {}))
            ctx.log(f"re-drawing from {cfg.stats} ({stats.count} snapshots); no fine-tuning")
        else:
            clock = Stopwatch()
            recipe = fine_tune_recipe(model, RATES, cfg.optimizer, cfg.lr, cfg.weight_decay)
            ctx.note("optimizer", recipe.record())
            stats = self._finetune(ctx, cfg, model, recipe)
            ctx.log(f"fine-tuned in {clock.seconds:.0f} s")
            if cfg.save_stats is not None and distributed.is_main():
                finetune = {
                    k: getattr(cfg, k) for k in ("epochs", "momentum", "batch_size", "augment", "burn_in", "every", "seed")
                }
                finetune.update(optimizer=recipe.optimizer, lr=recipe.lr, weight_decay=recipe.weight_decay)
                finetune["parent"] = ctx.parent_specs[0]
                stats.save(
                    cfg.save_stats,
                    {"architecture": arch.get("architecture", ""), "finetune": json.dumps(finetune, sort_keys=True)},
                )
                ctx.log(f"wrote the statistics to {cfg.save_stats}")
        if cfg.draws > 0 and stats.count < 2:
            raise PosthocError(
                f"drawing members needs at least 2 snapshots, the statistics hold {stats.count}; lower --burn-in or --every, or raise --epochs"
            )

        std = stats.std()
        numel = sum(t.numel() for t in std.values())
        mean_std = float(sum(float(s.double().sum()) for s in std.values()) / numel)
        drift = math.sqrt(
            sum(
                float((stats.mean[n].double() - p.detach().double()).pow(2).sum())
                for n, p in trainable_parameters(parent).items()
            )
        )
        norm = math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in trainable_parameters(parent).values()))
        ctx.note("snapshots", stats.count)
        ctx.note("mean_std", mean_std)
        ctx.note("relative_drift", drift / norm)  # ||mean - parent|| / ||parent||
        ctx.log(
            f"{stats.count} snapshots; mean per-weight std {mean_std:.3g}; the mean moved {100 * drift / norm:.2f}% from the parent"
        )

        # buffers: the fine-tuned model's (the parent's with --stats) until BatchNorm is re-estimated
        base = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        names = (["mean"] if cfg.include_mean else []) + [f"sample-{j}" for j in range(cfg.draws)]

        def network(i: int) -> dict[str, torch.Tensor]:  # the mean model first (--include-mean), then draw j
            j = i - int(cfg.include_mean)
            tensors = mean_weights(stats, params) if j < 0 else draw_member(stats, std, j, cfg.std_scale, cfg.seed, like=params)
            return {**base, **{k: v.detach().cpu() for k, v in tensors.items()}}

        bn_batches = None
        if cfg.bn_batches > 0 and has_batchnorm(model):
            bn_batches = ImageBatches(lambda: ctx.train_loader(128, seed=cfg.seed, augment="none"), cfg.bn_batches)

        def recalibrated(i: int) -> dict[str, torch.Tensor]:
            model.load_state_dict(network(i))
            recalibrate_bn(model, bn_batches, ctx.device)
            return {k: v.cpu() for k, v in bn_statistics(model).items()}

        clock = Stopwatch()
        indices = range(len(names))
        members = lambda items: progress(items, description="members", enabled=ctx.show_progress)
        if bn_batches is not None:  # each process re-estimates its block of the networks; rank 0 gets them all
            statistics = distributed.map_shards(recalibrated, indices, main_only=True, loop=members)
            if statistics is None:
                return None
            state_dicts = [{**network(i), **bn} for i, bn in zip(indices, statistics)]
        else:
            state_dicts = [network(i) for i in members(indices)] if distributed.is_main() else None
            if state_dicts is None:
                return None
        ctx.note("bn_recalibrated", bn_batches is not None)
        ctx.log(
            f"{len(names)} network(s) drawn"
            + (" and BatchNorm re-estimated" if bn_batches is not None else "")
            + f" in {clock.seconds:.0f} s"
        )
        if self.candidates:
            state_dicts, names = self._choose(ctx, model, state_dicts, names)
        group = MemberGroup.from_state_dicts(arch, state_dicts, names)
        return Ensemble(groups=[group], combine=Combine(rule="prob_mean"))

    def _choose(self, ctx: BoostContext, model: nn.Module, state_dicts: list, names: list[str]) -> tuple[list, list[str]]:
        """Keep the candidate member set with the lowest select NLL (probability mean of its members)."""
        fns = []
        for sd in state_dicts:
            net = copy.deepcopy(model)
            net.load_state_dict(sd)
            fns.append(lambda x, net=net.eval(): (net(x),))
        outputs, y = cache_outputs(fns, ctx.select_loader(256), ctx.device)
        probs = [o[0].softmax(-1) for o in outputs]  # mean first, then the draws
        results = []
        for with_mean, k in self.candidates:
            chosen = [0] if with_mean and k == 1 else ([0, *range(1, k)] if with_mean else list(range(1, k + 1)))
            nll = float(-torch.stack([probs[i] for i in chosen]).mean(0).gather(1, y[:, None]).clamp_min(1e-12).log().mean())
            results.append((nll, with_mean, k, chosen))
        nll, with_mean, k, chosen = min(results, key=lambda r: (r[0], r[2]))
        ctx.note("budget_choice", [{"include_mean": w, "members": m, "select_nll": round(n, 5)} for n, w, m, _ in results])
        ctx.log(f"chosen on the select part: {'the mean model' if chosen == [0] else f'{k} members'} (select NLL {nll:.4f})")
        self.configure(members=k, include_mean=with_mean)
        return [state_dicts[i] for i in chosen], ["mean" if i == 0 else f"sample-{i - 1}" for i in chosen]

    @staticmethod
    def _finetune(ctx: BoostContext, cfg: ResampleConfig, model: nn.Module, recipe: Recipe) -> WelfordStats:
        loader = ctx.train_loader(cfg.batch_size, seed=cfg.seed, augment=cfg.augment, shard="split")
        per_epoch = len(loader)
        if per_epoch == 0:
            raise PosthocError("the training split gave no batches; check --train-split or lower --batch-size")
        steps = max(1, round(cfg.epochs * per_epoch))
        expected = max(0, (steps - cfg.burn_in) // cfg.every)
        if expected == 0:
            raise PosthocError(
                f"--burn-in {cfg.burn_in} and --every {cfg.every} leave no snapshot in {steps} steps; lower them or raise --epochs"
            )
        if cfg.draws > 0 and expected < 2:
            raise PosthocError(
                f"drawing members needs at least 2 snapshots, {steps} steps with --burn-in {cfg.burn_in} --every {cfg.every} give {expected}; lower them or raise --epochs"
            )
        processes = distributed.world_size()
        batch = f"global batch {cfg.batch_size * processes} ({processes} processes x {cfg.batch_size}), " if processes > 1 else ""
        ctx.log(
            f"fine-tuning {steps} steps ({steps / per_epoch:.2f} epochs of {per_epoch} batches), {batch}{recipe.optimizer} "
            f"lr {recipe.lr:g}" + (f", momentum {cfg.momentum}" if recipe.optimizer == "sgd" else "") + f" ({recipe.reason})"
        )
        if processes > 1:
            ctx.note("processes", processes)
            ctx.note("global_batch", cfg.batch_size * processes)
        stats, summary = finetune_with_stats(
            model,
            loader,
            steps,
            lr=recipe.lr,
            momentum=cfg.momentum,
            weight_decay=recipe.weight_decay,
            optimizer=recipe.optimizer,
            burn_in=cfg.burn_in,
            every=cfg.every,
            dtype=STATS_DTYPES[cfg.stats_dtype],
            device=ctx.device,
            amp=ctx.amp,
            show_progress=ctx.show_progress,
        )
        ctx.note("steps", summary["steps"])
        ctx.note("steps_per_epoch", per_epoch)
        ctx.note("train_loss_first", round(summary["first_loss"], 5))
        ctx.note("train_loss_last", round(summary["last_loss"], 5))
        return stats

    @staticmethod
    def _check_stats(stats: WelfordStats, params: Mapping[str, torch.Tensor], meta: Mapping[str, str], arch: dict, path) -> None:
        saved_arch = meta.get("architecture")
        if saved_arch and saved_arch != arch.get("architecture"):
            raise PosthocError(
                f"{path} was recorded on {saved_arch}, not {arch.get('architecture')}; pass the model it was saved from"
            )
        missing = [n for n in params if n not in stats.mean]
        extra = [n for n in stats.mean if n not in params]
        if missing or extra:
            example = (missing or extra)[0]
            raise PosthocError(
                f"{path} was recorded for other parameters ('{example}' does not match); pass the model it was saved from"
            )
        for n, p in params.items():
            if tuple(stats.mean[n].shape) != tuple(p.shape):
                raise PosthocError(
                    f"{path} has '{n}' of shape {tuple(stats.mean[n].shape)}, the model's is {tuple(p.shape)}; pass the model it was saved from"
                )
