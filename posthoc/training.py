"""The training engine every method uses: the step loop, cached forward passes, BatchNorm re-estimation.

- :func:`fine_tune_recipe` is the one rule for the optimizer of a fine-tune (SGD for BatchNorm networks,
  AdamW for the others, each method's rates per family in :data:`FINE_TUNE_RATES`), and
  :func:`fine_tune_optimizer` builds it with its per-step schedule (:func:`sgd_with_schedule` for SGD).
- :func:`train_steps` is the one training loop (forward, loss, backward, optimizer and per-step
  scheduler, an ``after_step`` hook for methods that act on the weights between steps, optional
  mixed precision, a progress bar, losses read from the device only once per window, divergence
  detection); :func:`train_epochs` runs it epoch by epoch and keeps the epoch that scores best on the
  select part.
- :func:`cache_outputs` runs functions over a loader once and keeps their outputs on the CPU (the
  frozen part of a network over the training images); :func:`run_cached` runs a function over such a
  cache; :func:`materialize` keeps a loader's images in memory for repeated passes.
- :func:`recalibrate_bn` re-estimates BatchNorm statistics (``torch.optim.swa_utils.update_bn``) on
  :class:`ImageBatches`, the first training batches kept in memory when they fit.
- :func:`epoch_order` / :func:`batches_of` / :class:`CachedData` give seeded sample orders and batches
  over cached tensors; seeds come from :func:`posthoc.runtime.seeded_generator`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn

from . import distributed
from .command_options import OPTIMIZERS, SCHEDULES
from .errors import PosthocError
from .metrics import fit_temperature, scores
from .runtime import autocast, model_errors, progress, seeded_generator

BN_CACHE_BYTES = 1 << 30  # keep BatchNorm batches in memory when they fit in 1 GiB


# ------------------------------------------------------------------------------------ the loop
def train_steps(
    forward: Callable[[Any], torch.Tensor],
    batches: Iterable[tuple[Any, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    *,
    steps: int | None = None,
    scheduler: Any = None,
    loss_fn: Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor] | None = None,
    regularizer: Callable[[], torch.Tensor] | None = None,
    after_step: Callable[[int], None] | None = None,
    device: torch.device | None = None,
    amp: bool = False,
    window: int | None = None,
    show_progress: bool = False,
    description: str = "train",
) -> list[float]:
    """Run one optimizer step per batch of ``(inputs, targets)``; return every step's loss.

    ``forward(inputs)`` gives logits; the loss is ``loss_fn(logits, targets, inputs)`` (default: batch
    mean cross-entropy) plus ``regularizer()``; then backward, ``optimizer.step()``, ``scheduler.step()``
    (per step) and ``after_step(step)`` (1-based). Inputs (a tensor or a tuple of tensors) and targets
    move to ``device``. With ``amp``, the forward pass runs under autocast (bfloat16 on CPU, float16
    with a ``GradScaler`` on CUDA). Losses stay on the device and are read every ``window`` steps
    (default: a tenth of ``steps``), which is also when a non-finite loss stops training with a
    one-line error.
    """
    loss_fn = loss_fn or (lambda logits, y, _inputs: F.cross_entropy(logits, y))
    window = window or max(1, (steps or 100) // 10)
    scaler = None
    if amp and device is not None and device.type == "cuda":
        scaler = torch.amp.GradScaler("cuda")
    pending: list[torch.Tensor] = []
    losses: list[float] = []

    def flush(step: int) -> None:
        values = torch.stack(pending).float().cpu()
        pending.clear()
        if not torch.isfinite(values).all():
            raise PosthocError(f"training diverged by step {step} (loss {values[-1].item()}); lower the learning rate")
        losses.extend(values.tolist())

    step = 0
    for step, (inputs, y) in enumerate(progress(batches, total=steps, description=description, enabled=show_progress), 1):
        if device is not None:
            inputs, y = to_device(inputs, device), y.to(device, non_blocking=True)
        with autocast(device or torch.device("cpu"), amp), model_errors(description, inputs if torch.is_tensor(inputs) else None):
            loss = loss_fn(forward(inputs), y, inputs)
        if regularizer is not None:
            loss = loss + regularizer()
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        if scheduler is not None:
            scheduler.step()
        if after_step is not None:
            after_step(step)
        pending.append(loss.detach())
        if len(pending) == window:
            flush(step)
    if pending:
        flush(step)
    return losses


def to_device(inputs: Any, device: torch.device) -> Any:
    """A tensor, or a tuple of tensors, moved to ``device``."""
    if isinstance(inputs, torch.Tensor):
        return inputs.to(device, non_blocking=True)
    return tuple(t.to(device, non_blocking=True) for t in inputs)


def cycle(loader: Iterable, steps: int) -> Iterator:
    """Exactly ``steps`` batches of ``loader``, starting it again as often as needed (fractional epochs)."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)


def make_optimizer(kind: str, params: list[torch.Tensor], lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    """A fresh optimizer: Adam (AdamW with weight decay), AdamW (no decay on vectors: biases and norm
    weights, as timm's ``param_groups_weight_decay``) or SGD with momentum 0.9 (Nesterov)."""
    if kind == "adamw":
        return torch.optim.AdamW(decay_groups([(str(i), p) for i, p in enumerate(params)], weight_decay), lr=lr)
    if kind == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay else torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine annealing of the learning rate from its value to 0 over ``total_steps`` steps."""
    total = max(1, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def one_cycle(
    opt: torch.optim.Optimizer,
    max_lr: float,
    steps: int,
    pct_start: float,
    div_factor: float,
    final_div_factor: float,
    cycle_momentum: bool = True,
) -> torch.optim.lr_scheduler.OneCycleLR:
    """``torch.optim.lr_scheduler.OneCycleLR`` over ``steps`` steps. Where ``pct_start * steps`` is exactly 1
    torch's warm-up would end at step 0 and divide by zero; the warm-up then lasts one step."""
    total = max(1, steps)
    if float(pct_start * total) - 1 == 0:
        pct_start = (1 + 1e-6) / total
    return torch.optim.lr_scheduler.OneCycleLR(
        opt,
        max_lr=max_lr,
        total_steps=total,
        pct_start=pct_start,
        div_factor=div_factor,
        final_div_factor=final_div_factor,
        cycle_momentum=cycle_momentum,
    )


def sgd_with_schedule(
    params: list[torch.Tensor],
    steps: int,
    *,
    schedule: str = "onecycle",
    max_lr: float,
    weight_decay: float = 0.0,
    momentum: float = 0.9,
    pct_start: float = 0.1,
    div_factor: float = 100.0,
    final_div_factor: float = 1e4,
    nesterov: bool | None = None,
) -> tuple[torch.optim.Optimizer, Any]:
    """SGD with Nesterov momentum and its per-step scheduler for ``steps`` steps.

    ``onecycle``: ``torch.optim.lr_scheduler.OneCycleLR`` (warm-up from ``max_lr / div_factor`` over
    ``pct_start`` of the steps, cosine down to ``max_lr / div_factor / final_div_factor``, momentum cycled
    inversely between 0.85 and 0.95); ``cosine``: from ``max_lr`` to 0; ``constant``: ``max_lr``
    throughout (no scheduler). ``nesterov`` (cosine and constant; default: whenever ``momentum > 0``)
    can turn Nesterov off for a method whose paper uses classical momentum.
    """
    nesterov = momentum > 0 if nesterov is None else nesterov
    if schedule == "onecycle":
        opt = torch.optim.SGD(params, lr=max_lr / div_factor, momentum=0.9, nesterov=True, weight_decay=weight_decay)
        return opt, one_cycle(opt, max_lr, steps, pct_start, div_factor, final_div_factor)
    opt = torch.optim.SGD(params, lr=max_lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)
    if schedule == "cosine":
        return opt, cosine_schedule(opt, steps)
    if schedule == "constant":
        return opt, None
    raise PosthocError(f"unknown schedule '{schedule}'; use {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------------ the optimizer rule
ADAMW_BETAS = (0.9, 0.999)


@dataclass(frozen=True)
class FamilyRates:
    """A fine-tune's default peak rate and weight decay in each optimizer family.

    The SGD values are the method's own, chosen on BatchNorm CNNs (CIFAR ResNets). The AdamW values are
    fine-tuning rates of the range timm's ViT and ConvNeXt fine-tunes use (5e-5 to 5e-4, decoupled weight
    decay 0.05): 1e-4 where the network should stay close to the parent, 2e-4 for children that should
    move apart but stay accurate (5e-4 for whole networks moved their members' select NLL above the
    parent's on short tunes), 5e-4 where only the last layers train.
    """

    sgd_lr: float
    sgd_weight_decay: float
    adamw_lr: float
    adamw_weight_decay: float = 0.05

    def lr(self, optimizer: str) -> float:
        return self.sgd_lr if optimizer == "sgd" else self.adamw_lr

    def weight_decay(self, optimizer: str) -> float:
        return self.sgd_weight_decay if optimizer == "sgd" else self.adamw_weight_decay

    def describe(self, what: str) -> str:
        """``"0.05 with SGD, 0.0005 with AdamW"`` for ``what`` = ``lr`` or ``weight_decay`` (help texts)."""
        return f"{getattr(self, 'sgd_' + what):g} with SGD, {getattr(self, 'adamw_' + what):g} with AdamW"


FINE_TUNE_RATES = {  # every method that fine-tunes: its rates per family, in one table
    "sparse": FamilyRates(sgd_lr=0.05, sgd_weight_decay=5e-4, adamw_lr=2e-4),  # children leave the basin: a high rate
    "distill": FamilyRates(sgd_lr=0.02, sgd_weight_decay=5e-4, adamw_lr=1e-4),
    "resample": FamilyRates(sgd_lr=0.1, sgd_weight_decay=0.0, adamw_lr=1e-4),  # constant rate, momentum 0 (the paper)
    "lastlayer": FamilyRates(sgd_lr=0.003, sgd_weight_decay=0.0, adamw_lr=1e-4),  # last layers, best epoch kept
    "supernet": FamilyRates(sgd_lr=0.05, sgd_weight_decay=0.0, adamw_lr=5e-4),  # copies move apart: a high rate
}


@dataclass(frozen=True)
class Recipe:
    """A resolved fine-tune: the optimizer family, its peak rate and weight decay, and why."""

    optimizer: str
    lr: float
    weight_decay: float
    reason: str

    def record(self) -> dict[str, Any]:
        """What the artifact's measured notes keep."""
        return {"optimizer": self.optimizer, "lr": self.lr, "weight_decay": self.weight_decay, "rule": self.reason}


def optimizer_family(model: nn.Module, optimizer: str = "auto") -> tuple[str, str]:
    """``(family, reason)``: ``optimizer`` itself unless ``auto``, which is ``sgd`` (Nesterov) for a
    BatchNorm network (BatchNorm layers and no LayerNorm: ResNets, EfficientNets, the CNNs the SGD rates
    were tuned on) and ``adamw`` for every other (LayerNorm networks such as ViT and ConvNeXt, hybrids
    such as CoAtNet and MaxViT, normalization-free or GroupNorm ones), which timm trains and fine-tunes
    with AdamW; SGD rates tuned for a CIFAR ResNet derail them."""
    if optimizer not in (*OPTIMIZERS, "adam"):  # adam: the layer stages' plain Adam (lastlayer, supernet)
        raise PosthocError(f"unknown optimizer '{optimizer}'; use {', '.join(OPTIMIZERS)}")
    if optimizer != "auto":
        return optimizer, f"--optimizer {optimizer}"
    if has_batchnorm(model) and not any(isinstance(m, nn.LayerNorm) for m in model.modules()):
        return "sgd", "auto: a BatchNorm network gets SGD"
    return "adamw", "auto: a network with LayerNorm or without BatchNorm gets AdamW"


def fine_tune_recipe(
    model: nn.Module, rates: FamilyRates, optimizer: str = "auto", lr: float | None = None, weight_decay: float | None = None
) -> Recipe:
    """The one rule for a fine-tune's optimizer: the family from :func:`optimizer_family`, then ``lr`` and
    ``weight_decay`` as given or, when ``None``, the family's defaults in ``rates`` (a method's entry
    in :data:`FINE_TUNE_RATES`). Adam-type families (``adam``, ``adamw``) share the AdamW rate."""
    family, reason = optimizer_family(model, optimizer)
    default_kind = "sgd" if family == "sgd" else "adamw"
    lr = rates.lr(default_kind) if lr is None else lr
    if weight_decay is None:
        weight_decay = 0.0 if family == "adam" else rates.weight_decay(default_kind)
    return Recipe(family, float(lr), float(weight_decay), reason)


def decay_groups(
    named: list[tuple[str, torch.Tensor]], weight_decay: float, skip: set[str] | frozenset[str] = frozenset()
) -> list[dict[str, Any]]:
    """AdamW parameter groups as timm's ``param_groups_weight_decay``: no decay on vectors (biases, norm
    weights) nor on the names in ``skip`` (a timm model's ``no_weight_decay()``: position embeddings,
    class tokens), ``weight_decay`` on the rest."""
    skipped = lambda name, p: p.ndim <= 1 or name.endswith(".bias") or name in skip
    no_decay = [p for n, p in named if skipped(n, p)]
    decay = [p for n, p in named if not skipped(n, p)]
    return [
        g for g in ({"params": no_decay, "weight_decay": 0.0}, {"params": decay, "weight_decay": weight_decay}) if g["params"]
    ]


def fine_tune_optimizer(
    model: nn.Module,
    steps: int,
    recipe: Recipe,
    *,
    schedule: str = "onecycle",
    momentum: float = 0.9,
    nesterov: bool | None = None,
    pct_start: float = 0.1,
    div_factor: float = 100.0,
    final_div_factor: float = 1e4,
) -> tuple[torch.optim.Optimizer, Any]:
    """The optimizer of ``recipe`` over ``model``'s trainable parameters, with its per-step scheduler.

    SGD is :func:`sgd_with_schedule` (one-cycle cycles its momentum inversely, 0.95 -> 0.85 -> 0.95).
    AdamW keeps betas (0.9, 0.999) fixed (one-cycle cycles only the rate: the momentum cycle is an SGD
    heuristic, and timm's AdamW fine-tunes keep the betas) and takes timm's decay groups
    (:func:`decay_groups`). Schedules as :func:`sgd_with_schedule`: ``onecycle``, ``cosine``, ``constant``.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise PosthocError("the model has no trainable parameters to fine-tune")
    if recipe.optimizer == "sgd":
        return sgd_with_schedule(
            [p for _, p in named],
            steps,
            schedule=schedule,
            max_lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            momentum=momentum,
            pct_start=pct_start,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            nesterov=nesterov,
        )
    if schedule not in SCHEDULES:
        raise PosthocError(f"unknown schedule '{schedule}'; use {', '.join(SCHEDULES)}")
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    groups = decay_groups(named, recipe.weight_decay, skip)
    start = recipe.lr / div_factor if schedule == "onecycle" else recipe.lr
    opt = torch.optim.AdamW(groups, lr=start, betas=ADAMW_BETAS)
    if schedule == "onecycle":
        return opt, one_cycle(opt, recipe.lr, steps, pct_start, div_factor, final_div_factor, cycle_momentum=False)
    return opt, (cosine_schedule(opt, steps) if schedule == "cosine" else None)


def train_epochs(
    forward: Callable[[Any], torch.Tensor],
    params: list[nn.Parameter],
    batches: Callable[[int], Iterable],
    select_logits: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    optimizer: str,
    lr: float,
    steps_per_epoch: int,
    weight_decay: float = 0.0,
    l2: float = 0.0,
    train_modules: Sequence[nn.Module] = (),
    select_by: str = "nll",
    calibrated: bool = False,
    amp: bool = False,
    device: torch.device | None = None,
    show_progress: bool = False,
    description: str = "train",
) -> tuple[int, list[dict[str, float]]]:
    """Train ``params`` for ``epochs`` with a fresh optimizer (cosine-annealed per step); keep the best epoch.

    ``batches(epoch)`` yields ``(inputs, targets)``; ``select_logits()`` returns the select part's logits
    and targets under the current parameters. Epoch 0 (the starting parameters) is scored too, so the
    result is never worse on the select part than the start. ``select_by`` is ``nll``, ``top1`` or
    ``last``. ``train_modules`` are put in train mode while training (BatchNorm with ``--train-bn``); their
    buffers are restored with the best epoch. ``l2`` adds ``l2 * sum(p^2)`` over ``params`` to the
    loss (Keras's L2 regulariser, as the SuperNet thesis used). With ``calibrated`` (the result will be
    temperature-scaled), each epoch is also scored after fitting its own temperature on the select part
    (``nll_t``, ``t``) and NLL selection compares those. Returns ``(best_epoch, history)``.
    """
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    sched = cosine_schedule(opt, epochs * steps_per_epoch)
    buffers = [b for m in train_modules for b in m.buffers(recurse=False)]
    regularizer = (lambda: l2 * sum((p * p).sum() for p in params)) if l2 else None

    def snapshot():
        return [p.detach().clone() for p in params], [b.detach().clone() for b in buffers]

    def evaluate_select(epoch: int, train_loss: float | None) -> dict[str, float]:
        logits, y = select_logits()
        row = {"epoch": epoch, **{k: round(v, 5) for k, v in scores(logits, y).items()}}
        if calibrated:
            t = fit_temperature(logits, y)
            row.update(t=round(t, 4), nll_t=round(scores(logits, y, t)["nll"], 5))
        if train_loss is not None:
            row["train_loss"] = round(train_loss, 5)
        return row

    def key(row):
        if select_by == "last":
            return -row["epoch"]
        nll = row["nll_t"] if calibrated else row["nll"]
        return (nll, -row["top1"]) if select_by == "nll" else (-row["top1"], nll)

    history = [evaluate_select(0, None)]
    best, best_state = 0, snapshot()
    for epoch in range(1, epochs + 1):
        for m in train_modules:
            m.train()
        losses = train_steps(
            forward,
            batches(epoch),
            opt,
            steps=steps_per_epoch,
            scheduler=sched,
            regularizer=regularizer,
            amp=amp,
            device=device,
            show_progress=show_progress,
            description=f"{description} epoch {epoch}/{epochs}",
        )
        for m in train_modules:
            m.eval()
        row = evaluate_select(epoch, sum(losses) / max(len(losses), 1))
        history.append(row)
        if key(row) < key(history[best]):
            best, best_state = epoch, snapshot()
    with torch.no_grad():
        for p, v in zip(params, best_state[0]):
            p.copy_(v)
        for b, v in zip(buffers, best_state[1]):
            b.copy_(v)
    return best, history


# ------------------------------------------------------------------------------------ sample orders
def epoch_order(indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a seeded permutation of ``indices``."""
    return indices[torch.randperm(len(indices), generator=seeded_generator(seed, epoch))]


def batches_of(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Batches of ``order``; the last incomplete one is dropped when there is more than one batch
    (as the training loader does)."""
    n = len(order)
    stop = n - n % batch_size if n > batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


@dataclass
class CachedData:
    """Training inputs for the part of a network after a cut: cached tensors, or images streamed through
    the frozen prefix every epoch (``dataset`` with a per-epoch augmentation, ``prefix`` the frozen part)."""

    cache: tuple[torch.Tensor, ...] | None
    targets: torch.Tensor
    dataset: Any = None
    workers: int = 0

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, order: torch.Tensor, batch_size: int, prefix: Callable | None, device: torch.device, seed: int) -> Iterator:
        """``(inputs, targets)`` per batch in ``order``: cached inputs, or ``prefix(images)`` when streaming."""
        if self.cache is not None:
            for idx in batches_of(order, batch_size):
                yield tuple(t.index_select(0, idx).to(device) for t in self.cache), self.targets[idx].to(device)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset,
            batch_size=batch_size,
            sampler=order.tolist(),
            num_workers=self.workers,
            drop_last=len(order) > batch_size,
            generator=seeded_generator(seed),
        )
        for x, y in loader:
            with torch.no_grad():
                entries = prefix(_cpu_channels_last(x.to(device)))
            yield entries, y.to(device)


# ------------------------------------------------------------------------------------ cached forwards
@torch.no_grad()
def materialize(loader: Iterable, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep (up to ``limit``) images and targets of a loader in memory, for repeated cheap passes."""
    xs, ys, n = [], [], 0
    for x, y in loader:
        xs.append(x)
        ys.append(y)
        n += x.shape[0]
        if limit is not None and n >= limit:
            break
    x, y = torch.cat(xs), torch.cat(ys)
    return (x[:limit], y[:limit]) if limit is not None else (x, y)


@torch.no_grad()
def cache_outputs(
    fns: Sequence[Callable[[torch.Tensor], tuple[torch.Tensor, ...]]],
    loader: Iterable,
    device: torch.device,
    *,
    show_progress: bool = False,
    description: str = "cache",
    main_only: bool = False,
) -> tuple[list[tuple[torch.Tensor, ...]], torch.Tensor | None]:
    """One pass over ``loader``: every ``fn(images)`` (a tuple of tensors) on each batch, the images
    decoded once for all of them; returns each fn's outputs concatenated on the CPU, and the targets.

    A loader whose batches are split among processes (``make_loader(..., shard="batches")``) runs in
    parallel: each process runs its own batches and the outputs are gathered in the single-process order,
    on every process, or with ``main_only`` on rank 0 only (the others get ``([], None)``).
    """
    per_fn: list[list[list[torch.Tensor]]] = [[] for _ in fns]
    targets = []
    for x, y in progress(loader, description=description, enabled=show_progress):
        x = _cpu_channels_last(x.to(device))
        for store, fn in zip(per_fn, fns):
            with model_errors(description, x):
                out = fn(x)
            if not store:
                store.extend([] for _ in out)
            for lst, t in zip(store, out):
                lst.append(t.detach().float().cpu().contiguous())
        targets.append(y)
    if isinstance(getattr(loader, "batch_sampler", None), distributed.ShardedBatches):
        return _gathered(per_fn, targets, main_only)
    return [tuple(torch.cat(t) for t in store) for store in per_fn], torch.cat(targets)


def _gathered(per_fn: list[list[list[torch.Tensor]]], targets: list[torch.Tensor], main_only: bool):
    """:func:`cache_outputs`' per-process outputs gathered in rank (= batch) order; a process may have had
    no batches at all."""
    counts = distributed.all_gather([len(store) for store in per_fn])
    gather = lambda parts: distributed.gather_tensors(torch.cat(parts) if parts else None, main_only=main_only)
    outputs = []
    for i, store in enumerate(per_fn):
        width = max(c[i] for c in counts)
        outputs.append(tuple(gather(store[j] if j < len(store) else []) for j in range(width)))
    y = gather(targets)
    if main_only and not distributed.is_main():
        return [], None
    return outputs, y


@torch.no_grad()
def run_cached(fn: Callable[[tuple], Any], cache: Sequence[torch.Tensor], device: torch.device, batch: int = 1024):
    """Apply ``fn`` to ``cache`` (tensors with a common first dimension) batch by batch; concatenate
    each output on the CPU."""
    outs: list[list[torch.Tensor]] = []
    n = cache[0].shape[0]
    for i in range(0, n, batch):
        idx = torch.arange(i, min(i + batch, n))
        res = fn(tuple(t.index_select(0, idx).to(device) for t in cache))  # copies: in-place ops cannot touch the cache
        res = res if isinstance(res, tuple) else (res,)
        if not outs:
            outs = [[] for _ in res]
        for lst, r in zip(outs, res):
            lst.append(r.detach().float().cpu())
    return tuple(torch.cat(o) for o in outs)


def _cpu_channels_last(x: torch.Tensor) -> torch.Tensor:
    """Images in channels-last layout on the CPU, where its convolutions run faster."""
    if x.dim() == 4 and x.device.type == "cpu":
        return x.contiguous(memory_format=torch.channels_last)
    return x


# ------------------------------------------------------------------------------------ BatchNorm
def has_batchnorm(model: nn.Module) -> bool:
    """True when ``model`` holds a BatchNorm layer."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


class ImageBatches:
    """The first ``n`` image batches of a loader: kept in memory when they fit in 1 GiB, else re-read.

    ``make_loader()`` must give the same batches every time (a seeded order).
    """

    def __init__(self, make_loader: Callable[[], Iterable], n: int):
        self.make_loader, self.n = make_loader, n
        self.cache: list[torch.Tensor] | None = None
        batches = self._read()
        first = next(batches, None)
        if first is None:
            raise PosthocError("BatchNorm recalibration got no training images; check the training split")
        if first.element_size() * first.numel() * n <= BN_CACHE_BYTES:
            self.cache = [first, *batches]

    def _read(self) -> Iterator[torch.Tensor]:
        for i, batch in enumerate(self.make_loader()):
            if i >= self.n:
                break
            yield batch[0] if isinstance(batch, (list, tuple)) else batch

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.cache) if self.cache is not None else self._read()


def recalibrate_bn(
    model: nn.Module,
    batches: Iterable,
    device: torch.device,
    max_batches: int | None = None,
    modules: list[nn.Module] | None = None,
) -> nn.Module:
    """Re-estimate BatchNorm running statistics on ``batches`` (SWA's ``update_bn``).

    ``torch.optim.swa_utils.update_bn`` resets the statistics and averages them over the batches
    (cumulative mean, momentum None). Batches may be tensors, ``(images, targets)`` tuples, or dicts
    with an ``image`` / ``pixel_values`` entry. With ``modules``, only those BatchNorm layers are
    re-estimated (the same cumulative average) and every other layer stays in eval mode. Leaves the
    model in eval mode.
    """
    if not has_batchnorm(model):
        return model

    def images():
        seen = 0
        for batch in itertools.islice(batches, max_batches):
            seen += 1
            if isinstance(batch, dict):
                batch = batch.get("image", batch.get("pixel_values"))
            elif isinstance(batch, (list, tuple)):
                batch = batch[0]
            yield batch.to(device)
        if not seen:
            raise PosthocError("BatchNorm recalibration got no training images; check the training split")

    if modules is None:
        update_bn(images(), model, device=device)
        return model.eval()
    if not modules:
        return model.eval()
    momenta = {m: m.momentum for m in modules}
    model.eval()
    for m in modules:
        m.reset_running_stats()
        m.momentum = None
        m.train()
    with torch.no_grad():
        for x in images():
            model(x)
    for m, momentum in momenta.items():
        m.momentum = momentum
    return model.eval()
