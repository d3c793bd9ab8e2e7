"""Last-layers retraining (Bukowski 2020, §3.1), shared by ``lastlayer`` and ``supernet``.

After normal training the network is frozen and its last layers are retrained one at a time, last
first, each with a fresh optimizer, on the training images, keeping each stage's best epoch on the
select part. Choices where the thesis is silent:

- **Layers** are timm's parameter groups (:func:`posthoc.timm_io.last_layers`): layer 1 is the
  classifier, layer 2 the last block, and so on; the stem is never retrained.
- **Optimizer**: the rule every fine-tune shares (:func:`posthoc.training.fine_tune_recipe`): SGD
  (momentum 0.9, Nesterov) for a BatchNorm network, AdamW for any other (ViT, ConvNeXt), each at its
  family's rate unless ``--lr`` is given.
- **BatchNorm** outside the trained layer runs in eval mode (the thesis does not say; Keras freezes
  it); inside it stays in eval mode too by default (affine parameters train, statistics do not move), or
  uses batch statistics with ``--train-bn``.
- **Feature cache**: the frozen part before the earliest retrained layer runs once over the training
  and select images (un-augmented by default, ``--cache-augment light`` for one fixed random view) and
  every epoch trains on the cached activations; ``--no-feature-cache`` re-runs it on freshly augmented
  images every epoch. With the same seed and no augmentation both paths train the same weights.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from ..graph import Cut, FeaturesAndLogits
from ..options import Renamed, option
from ..runtime import seeded_generator
from ..timm_io import last_layers
from ..training import (
    FINE_TUNE_RATES,
    CachedData,
    FamilyRates,
    Recipe,
    batches_of,
    cache_outputs,
    epoch_order,
    fine_tune_recipe,
    run_cached,
    train_epochs,
)
from .base import BoostContext, MethodConfig, Stopwatch

OPTIMIZERS = ("sgd", "adam")  # the coupling layer's
STAGE_OPTIMIZERS = ("auto", "sgd", "adamw", "adam")


@dataclass
class RetrainConfig(MethodConfig):
    """Options of last-layers retraining (shared by ``lastlayer`` and ``supernet``)."""

    rates: ClassVar[FamilyRates] = FINE_TUNE_RATES["lastlayer"]
    renamed: ClassVar[dict[str, Renamed]] = {
        "retrain_layers": Renamed("last_layers"),
        "bn": Renamed("train_bn", lambda mode: mode == "train", "train is --train-bn, eval is the default", kind=str),
    }

    last_layers: int | None = option(
        2, "Layers retrained one at a time, last first: 1 = the classifier, 2 = also the last block, ...", ge=0
    )
    epochs_per_layer: int = option(3, "Epochs per retrained layer (the thesis used 3-4).", ge=1)
    optimizer: str = option(
        "auto",
        "Optimizer of each stage (a fresh one per stage): auto (sgd for a BatchNorm network, adamw for any other), "
        "sgd (momentum 0.9, Nesterov), adamw, or adam (no weight decay unless given).",
        choices=STAGE_OPTIMIZERS,
    )
    lr: float | None = option(
        None,
        f"Learning rate of the layer stages, cosine-annealed over each stage (default: {FINE_TUNE_RATES['lastlayer'].describe('lr')}).",
        gt=0,
    )
    weight_decay: float | None = option(
        None, "Weight decay of the layer stages (default: 0 with SGD, 0.05 with AdamW, decoupled).", ge=0
    )
    batch_size: int = option(128, "Training batch size.", ge=1)
    train_bn: bool = option(
        False, "Let BatchNorm inside the retrained layer use batch statistics (momentum update) instead of frozen ones."
    )
    bootstrap: bool | None = option(False, "Train each member on a bootstrap sample of the training images (with replacement).")
    feature_cache: bool = option(
        True,
        "Run the frozen part once and train on cached activations; --no-feature-cache re-runs it on augmented images every epoch.",
    )
    cache_augment: str = option(
        "none", "Augmentation of the single cached pass: none or light (one fixed random crop + flip).", choices=("none", "light")
    )
    augment: str = option(
        "light", "Augmentation per epoch with --no-feature-cache: light, timm or none.", choices=("light", "timm", "none")
    )
    select_by: str | None = option(
        "nll",
        "Keep each layer's epoch with the best select-part nll or top1, or the last epoch (last).",
        choices=("nll", "top1", "last"),
    )

    def validate(self) -> None:
        if self.bootstrap and not self.feature_cache:
            from ..errors import PosthocError

            raise PosthocError("--bootstrap needs the feature cache; drop --no-feature-cache")

    def recipe(self, model: nn.Module) -> Recipe:
        """The stages' optimizer for ``model`` by the shared rule (:func:`posthoc.training.fine_tune_recipe`)."""
        return fine_tune_recipe(model, self.rates, self.optimizer, self.lr, self.weight_decay)


class Retrainer:
    """Last-layers retraining of one model, on cached activations or streamed images.

    ``base`` cuts the model before all layers to retrain (it defines the cache); each stage's own cut
    is taken inside the part after ``base``, so one cached pass over the images serves every stage.
    With ``n = 0`` the cut is before the classifier and only features are extracted.
    """

    def __init__(self, model: nn.Module, n: int):
        from ..errors import PosthocError

        self.model = model.eval()
        self.net = FeaturesAndLogits(model).eval()
        self.units = last_layers(model, n)
        cut_names = [p for u in self.units for p in u] or last_layers(model, 1)[0]
        self.base = Cut(self.net, {f"model.{p}" for p in cut_names})
        if n >= 2 and [m for m, _ in self.base.outputs_map] != [True, True]:
            raise PosthocError("the retrained layers must produce the features; use --last-layers 1")

    def stage_cut(self, unit: int) -> Cut | None:
        """The cut before layer ``unit`` (1-based, last first) inside the base cut's rest; ``None``
        when that is the base cut itself (the earliest retrained layer)."""
        if unit == len(self.units):
            return None
        return Cut(self.base.suffix, {f"model.{p}" for p in self.units[unit - 1]})

    def logits(self, cache: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
        """The model's logits over cached base inputs."""
        return run_cached(lambda e: self.base.outputs(e)[1], cache, device)[0]


@dataclass
class StageResult:
    """One retraining stage: which layer, how many tensors, the epoch kept and the select history."""

    unit: int
    tensors: int
    best_epoch: int
    history: list[dict[str, float]]

    def summary(self) -> dict[str, Any]:
        return {"layer": self.unit, "tensors": self.tensors, "best_epoch": self.best_epoch, "select": self.history}


def retrain(
    retrainer: Retrainer,
    data: CachedData,
    select_cache: tuple[torch.Tensor, ...],
    select_targets: torch.Tensor,
    cfg: RetrainConfig,
    device: torch.device,
    *,
    seed: int,
    stage_caches: dict[int, tuple] | None = None,
    calibrated: bool = False,
    amp: bool = False,
    show_progress: bool = False,
    log: Callable[[str], None] = lambda m: None,
    name: str = "model",
) -> list[StageResult]:
    """Retrain ``retrainer``'s layers one at a time, last first (thesis §3.1), in place.

    ``data`` holds the training images' base inputs (or streams them); ``select_cache`` the select
    part's. ``stage_caches`` (shared between copies of one parent) memoises each stage's cached inputs,
    which depend only on the frozen original layers. With ``cfg.bootstrap`` the member trains on one
    bootstrap sample of the training images drawn with ``seed``. ``calibrated``: epochs are compared
    after temperature scaling (see :func:`posthoc.training.train_epochs`).
    """
    model, base = retrainer.model, retrainer.base
    stage_caches = {} if stage_caches is None else stage_caches
    n = len(data)
    indices = torch.randint(0, n, (n,), generator=seeded_generator(seed)) if cfg.bootstrap else torch.arange(n)
    recipe = cfg.recipe(model)
    results = []
    for unit, names in enumerate(retrainer.units, start=1):
        stage = retrainer.stage_cut(unit)
        params = [model.get_parameter(p) for p in names]
        model.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        owners = {p.rsplit(".", 1)[0] if "." in p else "" for p in names}
        bn_modules = [
            m for name_, m in model.named_modules() if name_ in owners and isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if stage is None:
            train_cache, sel_cache = data.cache, select_cache
        else:
            if unit not in stage_caches:  # the stage's input depends only on frozen, original layers

                def stage_in(e, stage=stage):
                    return stage.inputs(*base.boundary(e))

                stage_caches[unit] = (
                    run_cached(stage_in, data.cache, device) if data.cache is not None else None,
                    run_cached(stage_in, select_cache, device),
                )
            train_cache, sel_cache = stage_caches[unit]
        head = stage if stage is not None else base

        def forward(inputs, head=head):
            return head.outputs(inputs)[1]

        if data.cache is not None:
            stage_data = CachedData(train_cache, data.targets)

            def batches(epoch, stage_data=stage_data):
                return stage_data.batches(epoch_order(indices, seed, epoch), cfg.batch_size, None, device, seed + epoch)
        else:

            def batches(epoch, stage=stage):
                for entries, y in data.batches(
                    epoch_order(indices, seed, epoch), cfg.batch_size, base.inputs, device, seed + epoch
                ):
                    yield (tuple(entries) if stage is None else stage.inputs(*base.boundary(entries))), y

        def select_logits(sel_cache=sel_cache, forward=forward):
            return run_cached(forward, sel_cache, device)[0], select_targets

        best, history = train_epochs(
            forward,
            params,
            batches,
            select_logits,
            epochs=cfg.epochs_per_layer,
            optimizer=recipe.optimizer,
            lr=recipe.lr,
            weight_decay=recipe.weight_decay,
            steps_per_epoch=len(batches_of(indices, cfg.batch_size)),
            train_modules=bn_modules if cfg.train_bn else [],
            select_by=cfg.select_by,
            calibrated=calibrated,
            amp=amp,
            device=device,
            show_progress=show_progress,
            description=f"{name} layer {unit}",
        )
        model.requires_grad_(False)
        last = history[best]
        log(
            f"{name}: layer {unit} ({len(names)} tensors, e.g. {names[0]}): best epoch {best}, "
            f"select top-1 {last['top1']:.2f}% NLL {last['nll']:.4f}"
        )
        results.append(StageResult(unit, len(names), best, history))
    model.eval()
    return results


def training_data(ctx: BoostContext, cuts: Sequence[Cut], cfg: RetrainConfig, description: str = "caching training inputs"):
    """Cached base inputs of every cut over the training images (one pass), or streamed data.

    Under torchrun the cached pass is split among processes and gathered on rank 0, which trains alone
    (the other processes get no data). Returns ``(per-cut CachedData, seconds)``.
    """
    clock = Stopwatch()
    if cfg.feature_cache:
        loader = ctx.train_loader(256, shuffle=False, seed=cfg.seed, augment=cfg.cache_augment, shard="batches")
        caches, targets = cache_outputs(
            [c.inputs for c in cuts], loader, ctx.device, show_progress=ctx.show_progress, description=description, main_only=True
        )
        return [CachedData(c, targets) for c in caches], clock.seconds
    loader = ctx.train_loader(256, shuffle=False, seed=cfg.seed, augment=cfg.augment)
    dataset = loader.dataset
    targets = torch.as_tensor(dataset.targets if hasattr(dataset, "targets") else [y for _, y in dataset])
    return [CachedData(None, targets, dataset, loader.num_workers) for _ in cuts], clock.seconds


def select_data(ctx: BoostContext, cuts: Sequence[Cut]):
    """Cached base inputs of every cut over the select part (one pass) and the targets (under torchrun split
    among processes and gathered on rank 0, as :func:`training_data`)."""
    return cache_outputs(
        [c.inputs for c in cuts],
        ctx.select_loader(256, shard="batches"),
        ctx.device,
        show_progress=ctx.show_progress,
        description="caching select inputs",
        main_only=True,
    )


def cache_megabytes(*caches: Sequence[torch.Tensor] | None) -> float:
    """Memory held by cached tensors, in MiB."""
    return sum(t.numel() * t.element_size() for c in caches if c is not None for t in c) / 2**20
