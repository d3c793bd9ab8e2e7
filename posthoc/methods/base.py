"""The small interface every method implements and the context ``boost`` hands it.

A method is a class with a ``name``, a ``Config`` dataclass of its hyper-parameters and a
``build(ctx)`` that returns an :class:`~posthoc.ensemble.Ensemble`. Each config field is declared with
:func:`posthoc.options.option` (default, help text, accepted values); :func:`~posthoc.options.make_config`
checks them, the CLI turns them into ``posthoc boost --method NAME`` flags, and the whole config is
recorded in the artifact. Methods register themselves with :func:`posthoc.methods.registry.register`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed
from ..cost import widest_fit
from ..ensemble import Ensemble
from ..errors import PosthocError
from ..options import SEED, Options, make_config, option


@dataclass
class MethodConfig(Options):
    """Hyper-parameters shared by every method."""

    seed: int = option(0, "Random seed; the same seed gives a bit-identical artifact.", **SEED)


class Method:
    """Base class: subclasses set ``name``, ``Config``, ``summary`` and implement :meth:`build`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    summary: ClassVar[str] = ""
    min_parents: ClassVar[int] = 1
    max_parents: ClassVar[int | None] = 1

    def __init__(self, config: MethodConfig | None = None, **overrides: Any):
        self.config = config if config is not None else make_config(self.Config, overrides)

    def build(self, ctx: BoostContext) -> Ensemble | None:  # pragma: no cover - interface
        """The ensemble. Under torchrun every process calls it and does its share of the work; only rank 0's
        result is used (the others may return ``None``)."""
        raise NotImplementedError

    @classmethod
    def wrote(cls, path: Path) -> bool:
        """True when the existing file ``path`` is one this method writes through an option declared
        ``role="output"`` (a rerun may then replace it without ``--overwrite``); default: never."""
        return False

    def includes_parent(self) -> bool:
        """Whether one member of what :meth:`build` returns is the unchanged parent (recorded in the artifact)."""
        return bool(getattr(self.config, "include_parent", False))

    def fit_budget(self, parents: list[nn.Module], budget: float, given: set[str]) -> list[str]:
        """Set this method's cost knobs so the artifact's forward FLOPs stay within ``budget`` times the
        parent's (:mod:`posthoc.cost`); options in ``given`` were set explicitly and are kept. Returns
        one line per choice made (or per explicit option that overrides the budget)."""
        raise PosthocError(f"method '{self.name}' does not take --inference-budget yet; drop it")

    def fit_width_and_members(self, parents: list[nn.Module], budget: float, given: set[str]) -> tuple[int | None, int] | None:
        """The budget rule of methods whose members differ in their last layers (``--last-layers``, ``--members``):
        the widest member-specific part at which at least 4 members fit, then as many members as fit
        (:func:`posthoc.cost.widest_fit`); an option in ``given`` is kept. ``None`` when both were given."""
        cfg = self.config
        if {"members", "last_layers"} <= given:
            return None
        layers_options = [cfg.last_layers] if "last_layers" in given else None
        minimum = cfg.members if "members" in given else 4
        layers, members = widest_fit(parents[0], budget, cfg.members, minimum, layers_options)
        members = cfg.members if "members" in given else max(members, int(self.includes_parent()) + 1)
        return layers, members

    def configure(self, **changes: Any) -> None:
        """Replace config fields (checked again) after a budget chose them."""
        self.config = dataclasses.replace(self.config, **changes)
        self.config.validate()


@dataclass
class BoostContext:
    """What a method may use: parents, data, device, and a way to report progress.

    The training split is for fine-tuning only; the select part of the validation split is what a
    method tunes and selects on. A method never sees the data results are reported on.
    """

    parents: list[nn.Module]
    parent_specs: list[str]
    data_config: dict[str, Any]
    device: torch.device
    make_train_loader: Callable[..., Iterable]
    make_select_loader: Callable[..., Iterable]
    train_size: int
    select_size: int
    log: Callable[[str], None] = print
    show_progress: bool = True
    temperature_scaling: bool = True  # boost fits a temperature at the end: methods may select epochs after scaling
    amp: bool = False  # mixed precision in every training loop (float16 + GradScaler on CUDA, bfloat16 on CPU)
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def parent(self) -> nn.Module:
        return self.parents[0]

    def train_loader(
        self,
        batch_size: int = 128,
        *,
        shuffle: bool = True,
        seed: int = 0,
        augment: str = "light",
        subset: int | None = None,
        sample: Sequence[int] | None = None,
        shard: str | None = None,
    ):
        """Training images (with ``augment``: light, timm or none) in a seeded order; ``sample`` (indices
        into the training split, repeats allowed) restricts them to a bootstrap sample. ``shard`` splits
        the batches among processes (``"batches"`` or ``"split"``, see :func:`posthoc.data.make_loader`)."""
        extra = {} if sample is None else {"sample": sample}
        if shard is not None and distributed.world_size() > 1:  # one process: loaders as ever
            extra["shard"] = shard
        return self.make_train_loader(batch_size=batch_size, shuffle=shuffle, seed=seed, augment=augment, subset=subset, **extra)

    def select_loader(self, batch_size: int = 256, *, subset: int | None = None, shard: str | None = None):
        """The select part of the validation split, in a fixed order, eval transform; ``shard="batches"``
        gives each process its block of the batches."""
        extra = {"shard": shard} if shard is not None and distributed.world_size() > 1 else {}
        return self.make_select_loader(batch_size=batch_size, subset=subset, **extra)

    def note(self, key: str, value: Any) -> None:
        """Record a measured quantity (e.g. the sigma found) in the artifact's provenance."""
        self.notes[key] = value


class Stopwatch:
    """Wall seconds since creation."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
