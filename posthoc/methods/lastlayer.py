"""``lastlayer``: last-layers retraining of one network (Bukowski 2020, §3.1), and the machinery
``supernet`` shares with it.

After normal training, freeze the network and retrain its classifier; optionally then retrain earlier
layers one at a time, last first, each stage with a fresh optimizer, on the training images only,
keeping the epoch that scores best on the validation (select) part. The result is one network (an
artifact with one member and the ``prob_mean`` rule)::

    posthoc boost PARENT --method lastlayer --data DATA [--retrain-layers 2 --epochs-per-layer 3]

It is its own method rather than a ``supernet`` mode (``--copies 1 --no-coupling``): it takes exactly
one checkpoint, builds a single network with no coupling layer, and none of the coupling options
apply, so a separate name reads better on the command line and in the artifact.

Choices where the thesis is silent or ambiguous, and ours:

- **What a "layer" is.** The thesis counts Keras weight layers without saying how (its text says three,
  its tables four). We count timm's own parameter groups (``model.group_matcher(coarse=False)``, as
  ``noisy --scope`` does): layer 1 is the classifier group, layer 2 the last block, layer 3 the block
  before it, and so on; ``--retrain-layers 2`` on a ResNet-18 retrains ``fc`` and then ``layer4.1``
  (a BasicBlock: two convolutions, their BatchNorms). The stem is never retrained.
- **One layer trainable at a time, last first** (the thesis's descending order), each stage with a
  fresh optimizer (SGD, momentum 0.9, cosine-annealed over the stage) and ``--epochs-per-layer``
  epochs; the select part scores the starting weights and every epoch, and the best (lowest NLL by
  default) is kept, so a stage that does not help changes nothing.
- **BatchNorm.** Everything outside the layer being trained runs in eval mode (running statistics
  frozen; the thesis does not say, Keras freezes them). Inside the retrained block BN also stays in
  eval mode by default (``--bn eval``): its affine parameters train, its statistics do not move, so the
  block computes at training time exactly the function it computes in the artifact (with batches of
  128 single-pixel activations, as ResNet-18's last block sees on CIFAR-10, batch statistics are
  noisy). ``--bn train`` uses batch statistics and updates the running ones with BN's momentum; on the
  CIFAR-10 parents both modes left the block stage without a select-NLL gain.
- **Feature cache.** Training touches only the part of the network from the earliest retrained layer
  on. That part's input (for the classifier: the penultimate features; for a block: its input
  activations) is computed once over the training and select images by the traced shared prefix
  (``posthoc.fused.split_shared_prefix``), and later stages take their inputs from that cache through
  the frozen layers in between; every epoch then runs only the retrained part on cached tensors (a
  head epoch costs well under a second, a ResNet-18 last-block epoch a few seconds on CIFAR-10).
  What this means for **augmentation**: cached inputs are of one pass over the training images,
  un-augmented by default (``--cache-augment none``) or one fixed random-crop + flip pass
  (``--cache-augment light``); every epoch sees the same views, so the retrained layers get no new
  augmentation. ``--no-feature-cache`` instead runs the frozen part on freshly augmented images
  (``--augment``) every epoch, at the cost of a forward pass per epoch; with the same seed and no
  augmentation both paths train the same weights. The cache holds N x (size of the cut activations)
  floats in memory (ResNet-18 on CIFAR-10 at ``--retrain-layers 2``: 45,000 x 512 floats, 92 MB).
- **Temperature.** ``--temperature-scaling`` fits one temperature on the select part after training
  (stored in the artifact's combine rule), and epochs are then compared after scaling; off by default
  here so that ``lastlayer`` is retraining only.

Defaults, measured on CIFAR-10 ResNet-18 parents (val:select): SGD at 0.003 gave the best head
(select NLL 0.5495 -> 0.5444 after one epoch; Adam 1e-4 0.5446; larger rates raised it). The last
block (layer 2) never improved the select NLL (six optimizer / rate / BN settings, best epoch 0 in
each), because these parents were trained to convergence with an annealed learning rate, unlike the
thesis's; ``--retrain-layers 1`` then gives the same network at less than half the cost.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..ensemble import Combine, Ensemble
from ..errors import PosthocError
from ..fused import FeaturesAndLogits, split_shared_prefix
from ..metrics import ClassificationMetrics
from ..runtime import progress
from ..sources import member_name
from . import register
from .base import BoostContext, Method, MethodConfig, Stopwatch, option

OPTIMIZERS = ("adam", "sgd")
AUGMENTS = ("none", "light", "timm")
SELECT_BY = ("nll", "top1", "last")
BN_MODES = ("eval", "train")


# ------------------------------------------------------------------------------------ options
@dataclass
class RetrainConfig(MethodConfig):
    """Options of last-layers retraining (shared by ``lastlayer`` and ``supernet``)."""

    retrain_layers: int | None = option(2, "Layers retrained one at a time, last first: 1 = the classifier, 2 = also the last block, ...")
    epochs_per_layer: int = option(3, "Epochs per retrained layer (the thesis used 3-4).")
    optimizer: str = option("sgd", "Optimizer of each stage (a fresh one per stage): sgd (momentum 0.9, Nesterov) or adam.")
    lr: float = option(0.003, "Learning rate of the layer stages (cosine-annealed over each stage).")
    weight_decay: float = option(0.0, "Weight decay of the layer stages (decoupled for adam).")
    batch_size: int = option(128, "Training batch size.")
    bn: str = option("eval", "BatchNorm inside the retrained block: eval (statistics frozen) or train (batch statistics, momentum update).")
    bootstrap: bool | None = option(False, "Train each member on a bootstrap sample of the training images (with replacement).")
    feature_cache: bool = option(True, "Run the frozen part once and train on cached activations; --no-feature-cache re-runs it on augmented images every epoch.")
    cache_augment: str = option("none", "Augmentation of the single cached pass: none or light (one fixed random crop + flip).")
    augment: str = option("light", "Augmentation per epoch with --no-feature-cache: light, timm or none.")
    select_by: str | None = option("nll", "Keep each layer's epoch with the best select-part nll or top1, or the last epoch (last).")
    temperature_scaling: bool = option(False, "Fit a temperature on the select part after training (stored in the artifact).")

    def validate(self) -> None:
        if self.retrain_layers is not None and self.retrain_layers < 0:
            raise PosthocError(f"--retrain-layers must be 0 or more, got {self.retrain_layers}")
        if self.epochs_per_layer < 1:
            raise PosthocError(f"--epochs-per-layer must be at least 1, got {self.epochs_per_layer}")
        if self.optimizer not in OPTIMIZERS:
            raise PosthocError(f"--optimizer must be adam or sgd, got '{self.optimizer}'")
        if not self.lr > 0:
            raise PosthocError(f"--lr must be positive, got {self.lr}")
        if self.weight_decay < 0:
            raise PosthocError(f"--weight-decay must be 0 or more, got {self.weight_decay}")
        if self.batch_size < 1:
            raise PosthocError(f"--batch-size must be at least 1, got {self.batch_size}")
        if self.bn not in BN_MODES:
            raise PosthocError(f"--bn must be eval or train, got '{self.bn}'")
        if self.cache_augment not in ("none", "light"):
            raise PosthocError(f"--cache-augment must be none or light, got '{self.cache_augment}'")
        if self.augment not in AUGMENTS:
            raise PosthocError(f"--augment must be light, timm or none, got '{self.augment}'")
        if self.select_by is not None and self.select_by not in SELECT_BY:
            raise PosthocError(f"--select-by must be nll, top1 or last, got '{self.select_by}'")
        if self.bootstrap and not self.feature_cache:
            raise PosthocError("--bootstrap needs the feature cache; drop --no-feature-cache")


# ------------------------------------------------------------------------------------ layers
def layer_units(model: nn.Module, n: int) -> list[list[str]]:
    """Parameter names of the last ``n`` layers, last first: the classifier group, then timm's blocks.

    Layers are timm's parameter groups (``group_matcher(coarse=False)``): the last group holds the
    classifier (and whatever timm leaves unassigned), the groups before it are the blocks, the first is
    the stem, which is never retrained. ``n = 0`` gives ``[]``.
    """
    from timm.models._manipulate import group_parameters

    if n == 0:
        return []
    if not hasattr(model, "group_matcher"):
        if n > 1:
            raise PosthocError(f"{type(model).__name__} does not describe its blocks (no group_matcher); use --retrain-layers 1")
        classifier = model.get_classifier()
        owner = next(name for name, m in model.named_modules() if m is classifier)
        return [[f"{owner}.{p}" for p, _ in classifier.named_parameters()]]
    groups = [list(g) for g in group_parameters(model, model.group_matcher(coarse=False)).values()]
    if n > len(groups) - 1:
        raise PosthocError(f"--retrain-layers {n} is more than this model has: the classifier and {len(groups) - 2} blocks")
    return [groups[-i] for i in range(1, n + 1)]


def modules_of(model: nn.Module, names: Sequence[str]) -> list[nn.Module]:
    """The modules that own the parameters ``names``."""
    owners = {n.rsplit(".", 1)[0] if "." in n else "" for n in names}
    return [m for name, m in model.named_modules() if name in owners]


class Cut:
    """A network with outputs ``(features, logits)`` cut before the parameters ``names``.

    ``inputs(*args)`` runs the frozen part (the shared prefix of the traced graph) and returns the
    distinct tensors the rest needs, which is what gets cached; ``outputs(inputs)`` runs the rest
    (everything downstream of ``names``) and returns ``(features, logits)``. The rest calls the
    original network's modules, so training it trains the network in place.
    """

    def __init__(self, net: nn.Module, names: set[str]):
        prefix, suffix, outputs, nb = split_shared_prefix(net, names)
        if prefix is None:
            raise PosthocError(f"torch.fx cannot trace {type(getattr(net, 'model', net)).__name__}; last-layers retraining needs a traceable model")
        if not any(is_member for is_member, _ in outputs):
            raise PosthocError("the retrained layers do not influence the logits; check --retrain-layers")
        self.prefix, self.suffix, self.outputs_map, self.num_boundary = prefix, suffix, outputs, nb
        # the prefix returns the boundary values, then the shared graph outputs; one node may be both
        results = next(n for n in prefix.graph.nodes if n.op == "output").args[0]
        distinct: list = []
        self._alias = []
        for node in results:
            if node not in distinct:
                distinct.append(node)
            self._alias.append(distinct.index(node))
        self._keep = [self._alias.index(j) for j in range(len(distinct))]

    def inputs(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The frozen part's results, each distinct tensor once (what gets cached)."""
        out = self.prefix(*args)
        return tuple(out[i] for i in self._keep)

    def boundary(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """The tensors the rest of the network reads, from :meth:`inputs`'s result."""
        return tuple(inputs[self._alias[i]] for i in range(self.num_boundary))

    def outputs(self, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(features, logits)`` from :meth:`inputs`'s result (cached or fresh)."""
        full = [inputs[j] for j in self._alias]
        rest = self.suffix(*full[: self.num_boundary])
        feats, logits = (rest[i] if is_member else full[i] for is_member, i in self.outputs_map)
        return feats, logits


class Retrainer:
    """Last-layers retraining of one model, on cached activations or streamed images.

    ``base`` cuts the model before all layers to retrain (it defines the cache); each stage's own cut
    is taken inside the part after ``base``, so one cached pass over the images serves every stage.
    With ``n = 0`` the cut is before the classifier and only features are extracted.
    """

    def __init__(self, model: nn.Module, n: int):
        self.model = model.eval()
        self.net = FeaturesAndLogits(model).eval()
        self.units = layer_units(model, n)
        cut_names = [p for u in self.units for p in u] or layer_units(model, 1)[0]
        self.base = Cut(self.net, {f"model.{p}" for p in cut_names})
        if n >= 2 and [m for m, _ in self.base.outputs_map] != [True, True]:
            raise PosthocError("the retrained layers must produce the features; use --retrain-layers 1")

    def stage_cut(self, unit: int) -> Cut | None:
        """The cut before layer ``unit`` (1-based, last first) inside the base cut's rest; ``None``
        when that is the base cut itself (the earliest retrained layer)."""
        if unit == len(self.units):
            return None
        return Cut(self.base.suffix, {f"model.{p}" for p in self.units[unit - 1]})


def stage_inputs(base: Cut, stage: Cut | None, entries: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """A stage's inputs from the base cut's inputs (the identity for the earliest layer)."""
    return tuple(entries) if stage is None else stage.inputs(*base.boundary(entries))


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


@torch.no_grad()
def cache_inputs(cuts: Sequence[Cut], loader, device: torch.device, *, show_progress: bool = False, description: str = "cache"):
    """One pass over ``loader``: every cut's :meth:`Cut.inputs` on each batch (the images are decoded
    once for all cuts), concatenated on the CPU, and the targets."""
    per_cut: list[list[list[torch.Tensor]]] = [[] for _ in cuts]
    targets = []
    for x, y in progress(loader, description=description, enabled=show_progress):
        x = x.to(device)
        if x.dim() == 4 and device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last)
        for store, cut in zip(per_cut, cuts):
            out = cut.inputs(x)
            if not store:
                store.extend([] for _ in out)
            for lst, t in zip(store, out):
                lst.append(t.detach().float().cpu().contiguous())
        targets.append(y)
    return [tuple(torch.cat(t) for t in store) for store in per_cut], torch.cat(targets)


# ------------------------------------------------------------------------------------ training
def scores(logits: torch.Tensor, y: torch.Tensor, temperature: float = 1.0) -> dict[str, float]:
    """top-1 (%), NLL and ECE (%) of ``softmax(logits / temperature)``."""
    m = ClassificationMetrics()
    m.update((logits.float() / temperature).softmax(-1), y)
    r = m.compute()
    return {"top1": r["top1"], "nll": r["nll"], "ece": r["ece"]}


def fit_temperature(logits: torch.Tensor, y: torch.Tensor, iterations: int = 60) -> float:
    """The temperature minimising NLL of ``softmax(logits / T)`` (golden-section search on log T in
    [1/20, 20]; the NLL is convex in 1/T, so the search finds the global minimum)."""
    logits, y = logits.double(), y.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / math.exp(log_t), y))

    lo, hi = math.log(0.05), math.log(20.0)
    g = (math.sqrt(5) - 1) / 2
    a, b = hi - g * (hi - lo), lo + g * (hi - lo)
    fa, fb = nll(a), nll(b)
    for _ in range(iterations):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - g * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + g * (hi - lo)
            fb = nll(b)
    return math.exp((lo + hi) / 2)


def make_optimizer(kind: str, params: list[torch.Tensor], lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """A fresh optimizer: Adam(W) or SGD with momentum 0.9 (Nesterov)."""
    if kind == "adam":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay) if weight_decay else torch.optim.Adam(params, lr=lr)
    return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)


def epoch_order(indices: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """The sample order of one epoch: a seeded permutation of ``indices``."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return indices[torch.randperm(len(indices), generator=gen)]


def batches_of(order: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """Batches of ``order``; the last incomplete one is dropped when there is more than one batch
    (as the training loader does)."""
    n = len(order)
    stop = n - n % batch_size if n > batch_size else n
    return [order[i : i + batch_size] for i in range(0, stop, batch_size)]


@dataclass
class TrainingData:
    """Where a stage's training batches come from: cached base inputs, or images streamed through the
    frozen prefix every epoch (``dataset`` with a per-epoch augmentation)."""

    cache: tuple[torch.Tensor, ...] | None
    targets: torch.Tensor
    dataset: Any = None
    workers: int = 0

    def __len__(self) -> int:
        return len(self.targets)

    def batches(self, order: torch.Tensor, batch_size: int, base: Cut, device: torch.device, seed: int) -> Iterator:
        """``(base inputs, targets)`` per batch in ``order``."""
        if self.cache is not None:
            for idx in batches_of(order, batch_size):
                yield tuple(t.index_select(0, idx).to(device) for t in self.cache), self.targets[idx].to(device)
            return
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=batch_size, sampler=order.tolist(), num_workers=self.workers,
            drop_last=len(order) > batch_size, generator=torch.Generator().manual_seed(seed),
        )
        for x, y in loader:
            x = x.to(device)
            if x.dim() == 4 and device.type == "cpu":
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.no_grad():
                entries = base.inputs(x)
            yield entries, y.to(device)


@dataclass
class StageResult:
    """One retraining stage: which layer, how many tensors, the epoch kept and the select history."""

    unit: int
    tensors: int
    best_epoch: int
    history: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        return {"layer": self.unit, "tensors": self.tensors, "best_epoch": self.best_epoch, "select": self.history}


def train_stage(
    fn: Callable[[tuple], torch.Tensor],
    params: list[nn.Parameter],
    train_modules: list[nn.Module],
    batches: Callable[[int], Iterator],
    select_inputs: Callable[[], tuple[torch.Tensor, torch.Tensor]],
    *,
    epochs: int,
    optimizer: str,
    lr: float,
    weight_decay: float = 0.0,
    l2: float = 0.0,
    steps_per_epoch: int,
    select_by: str = "nll",
    calibrated: bool = False,
    show_progress: bool = False,
    description: str = "train",
) -> tuple[int, list[dict[str, float]]]:
    """Train ``params`` for ``epochs`` with a fresh optimizer; keep the best epoch on the select part.

    ``fn(inputs) -> logits``; ``batches(epoch)`` yields ``(inputs, targets)``; ``select_inputs()``
    returns the select part's logits and targets under the current parameters. Epoch 0 (the starting
    parameters) is scored too, so the result is never worse on the select part than the start.
    ``train_modules`` are put in train mode while training (BatchNorm ``--bn train``); their buffers are
    restored with the best epoch. ``l2`` adds ``l2 * sum(p^2)`` over ``params`` to the loss (Keras's
    L2 regulariser, as the thesis used). With ``calibrated`` (the result will be temperature-scaled),
    each epoch is also scored after fitting its own temperature on the select part (``nll_t``, ``t``)
    and NLL selection compares those: training on the members' own training images makes the layer
    overconfident, which raises the raw NLL even while the prediction improves. Returns
    ``(best_epoch, history)``.
    """
    opt = make_optimizer(optimizer, params, lr, weight_decay)
    total = max(1, epochs * steps_per_epoch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))
    buffers = [b for m in train_modules for b in m.buffers(recurse=False)]

    def snapshot():
        return [p.detach().clone() for p in params], [b.detach().clone() for b in buffers]

    def evaluate_select(epoch: int, train_loss: float | None) -> dict[str, float]:
        logits, y = select_inputs()
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
        loss_sum, count = torch.zeros(()), 0  # summed on device: no host sync per step
        for inputs, y in progress(batches(epoch), total=steps_per_epoch, description=f"{description} epoch {epoch}/{epochs}", enabled=show_progress):
            logits = fn(inputs)
            loss = F.cross_entropy(logits, y)
            if l2:
                loss = loss + l2 * sum((p * p).sum() for p in params)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            loss_sum = loss_sum.to(loss.device) + loss.detach() * len(y)
            count += len(y)
        for m in train_modules:
            m.eval()
        row = evaluate_select(epoch, loss_sum.item() / max(count, 1))
        history.append(row)
        if key(row) < key(history[best]):
            best, best_state = epoch, snapshot()
    with torch.no_grad():
        for p, v in zip(params, best_state[0]):
            p.copy_(v)
        for b, v in zip(buffers, best_state[1]):
            b.copy_(v)
    return best, history


def retrain(
    retrainer: Retrainer,
    data: TrainingData,
    select_cache: tuple[torch.Tensor, ...],
    select_targets: torch.Tensor,
    cfg: RetrainConfig,
    device: torch.device,
    *,
    seed: int,
    stage_caches: dict[int, tuple] | None = None,
    calibrated: bool = False,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda m: None,
    name: str = "model",
) -> list[StageResult]:
    """Retrain ``retrainer``'s layers one at a time, last first (thesis §3.1), in place.

    ``data`` holds the training images' base inputs (or streams them); ``select_cache`` the select
    part's. ``stage_caches`` (shared between copies of one parent) memoises each stage's cached inputs,
    which depend only on the frozen original layers. With ``cfg.bootstrap`` the member trains on one
    bootstrap sample of the training images drawn with ``seed``. ``calibrated``: epochs are compared
    after temperature scaling (see :func:`train_stage`).
    """
    model, base = retrainer.model, retrainer.base
    stage_caches = {} if stage_caches is None else stage_caches
    n = len(data)
    gen = torch.Generator().manual_seed(seed)
    indices = torch.randint(0, n, (n,), generator=gen) if cfg.bootstrap else torch.arange(n)
    results = []
    for unit, names in enumerate(retrainer.units, start=1):
        stage = retrainer.stage_cut(unit)
        params = [model.get_parameter(p) for p in names]
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        bn_modules = [m for m in modules_of(model, names) if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        train_modules = bn_modules if cfg.bn == "train" else []
        if stage is None:
            train_cache, sel_cache = data.cache, select_cache
        else:
            if unit not in stage_caches:  # the stage's input depends only on frozen, original layers
                stage_caches[unit] = (
                    run_cached(lambda e: stage.inputs(*base.boundary(e)), data.cache, device) if data.cache is not None else None,
                    run_cached(lambda e: stage.inputs(*base.boundary(e)), select_cache, device),
                )
            train_cache, sel_cache = stage_caches[unit]
        head = stage if stage is not None else base

        def fn(inputs, head=head):
            return head.outputs(inputs)[1]

        if data.cache is not None:
            stage_data = TrainingData(train_cache, data.targets)

            def batches(epoch, stage_data=stage_data):
                return stage_data.batches(epoch_order(indices, seed, epoch), cfg.batch_size, base, device, seed + epoch)
        else:
            def batches(epoch, stage=stage):
                for entries, y in data.batches(epoch_order(indices, seed, epoch), cfg.batch_size, base, device, seed + epoch):
                    yield stage_inputs(base, stage, entries), y

        def select_inputs(sel_cache=sel_cache, fn=fn):
            return run_cached(fn, sel_cache, device)[0], select_targets

        steps = len(batches_of(indices, cfg.batch_size))
        best, history = train_stage(
            fn, params, train_modules, batches, select_inputs, epochs=cfg.epochs_per_layer, optimizer=cfg.optimizer,
            lr=cfg.lr, weight_decay=cfg.weight_decay, steps_per_epoch=steps, select_by=cfg.select_by,
            calibrated=calibrated, show_progress=show_progress, description=f"{name} layer {unit}",
        )
        model.requires_grad_(False)
        last = history[best]
        log(f"{name}: layer {unit} ({len(names)} tensors, e.g. {names[0]}): best epoch {best}, select top-1 {last['top1']:.2f}% NLL {last['nll']:.4f}")
        results.append(StageResult(unit, len(names), best, history))
    model.eval()
    return results


# ------------------------------------------------------------------------------------ data helpers
def training_data(ctx: BoostContext, cuts: Sequence[Cut], cfg: RetrainConfig, description: str = "caching training inputs"):
    """Cached base inputs of every cut over the training images (one pass), or streamed data.

    Returns ``(per-cut TrainingData, seconds)``.
    """
    clock = Stopwatch()
    if cfg.feature_cache:
        loader = ctx.train_loader(256, shuffle=False, seed=cfg.seed, augment=cfg.cache_augment)
        caches, targets = cache_inputs(cuts, loader, ctx.device, show_progress=ctx.show_progress, description=description)
        return [TrainingData(c, targets) for c in caches], clock.seconds
    loader = ctx.train_loader(256, shuffle=False, seed=cfg.seed, augment=cfg.augment)
    dataset = loader.dataset
    targets = torch.as_tensor(dataset.targets if hasattr(dataset, "targets") else [y for _, y in dataset])
    return [TrainingData(None, targets, dataset, loader.num_workers) for _ in cuts], clock.seconds


def select_data(ctx: BoostContext, cuts: Sequence[Cut]):
    """Cached base inputs of every cut over the select part (one pass) and the targets."""
    return cache_inputs(cuts, ctx.select_loader(256), ctx.device, show_progress=ctx.show_progress, description="caching select inputs")


def cache_megabytes(*caches: Sequence[torch.Tensor] | None) -> float:
    """Memory held by cached tensors, in MiB."""
    return sum(t.numel() * t.element_size() for c in caches if c is not None for t in c) / 2**20


# ------------------------------------------------------------------------------------ the method
@dataclass
class LastLayerConfig(RetrainConfig):
    """``lastlayer``'s options: those of :class:`RetrainConfig`, with at least the classifier retrained."""

    def validate(self) -> None:
        super().validate()
        if self.retrain_layers is None or self.retrain_layers < 1:
            raise PosthocError("--retrain-layers must be at least 1 for lastlayer (1 = the classifier only)")


@register
class LastLayer(Method):
    name = "lastlayer"
    Config = LastLayerConfig
    summary = "Retrain the classifier, then earlier blocks one at a time (last first) on cached activations; one network."
    card_text = (
        "Last-layers retraining (Bukowski 2020, §3.1): the network is frozen and its classifier retrained, then "
        "earlier blocks one at a time, last first, each with a fresh optimizer on the training images; the best "
        "epoch of each stage on the validation (select) split is kept. The result is a single network."
    )

    def build(self, ctx: BoostContext) -> Ensemble:
        cfg: LastLayerConfig = self.config
        model = copy.deepcopy(ctx.parent).eval()
        retrainer = Retrainer(model, cfg.retrain_layers)
        (data,), seconds = training_data(ctx, [retrainer.base], cfg)
        (sel_cache,), sel_y = select_data(ctx, [retrainer.base])
        ctx.note("cache_mb", round(cache_megabytes(data.cache, sel_cache), 1))
        ctx.note("select_before", scores(run_cached(lambda e: retrainer.base.outputs(e)[1], sel_cache, ctx.device)[0], sel_y))
        clock = Stopwatch()
        stages = retrain(retrainer, data, sel_cache, sel_y, cfg, ctx.device, seed=cfg.seed, calibrated=cfg.temperature_scaling,
                         show_progress=ctx.show_progress,
                         log=ctx.log, name=member_name(ctx.parent_specs[0]))
        ctx.log(f"wall time (not stored: artifacts must be reproducible): caching {seconds:.1f} s, retraining {clock.seconds:.1f} s")
        ctx.note("stages", [s.summary() for s in stages])
        logits = run_cached(lambda e: retrainer.base.outputs(e)[1], sel_cache, ctx.device)[0]
        ctx.note("select_after", scores(logits, sel_y))
        temperature = 1.0
        if cfg.temperature_scaling:
            temperature = fit_temperature(logits, sel_y)
            ctx.note("temperature", round(temperature, 5))
            ctx.note("select_after_temperature", scores(logits, sel_y, temperature))
        return Ensemble.from_models([model], [member_name(ctx.parent_specs[0])], combine=Combine(rule="prob_mean", temperature=temperature))
