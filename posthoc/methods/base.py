"""The small interface every method implements, and the context ``boost`` hands it.

A method is a class with a ``name``, a typed ``Config`` dataclass of its hyper-parameters and a
``build(ctx)`` that returns an :class:`~posthoc.ensemble.Ensemble`. Config fields become
``posthoc boost`` flags automatically (``target_kl`` -> ``--target-kl``; booleans get ``--x/--no-x``),
their ``metadata["help"]`` is the flag's help, and the whole config is written into the artifact.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from torch import nn

from ..ensemble import Ensemble
from ..errors import PosthocError


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A config field with help text (shown by ``posthoc methods`` and ``posthoc boost``)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return field(default=default, metadata={"help": help, **kwargs})


@dataclass
class MethodConfig:
    """Hyper-parameters shared by every method."""

    seed: int = option(0, "Random seed; the same seed gives a bit-identical artifact.")


class Method:
    """Base class: subclasses set ``name``, ``Config``, ``summary`` and implement :meth:`build`."""

    name: ClassVar[str] = ""
    Config: ClassVar[type[MethodConfig]] = MethodConfig
    summary: ClassVar[str] = ""
    card_text: ClassVar[str] = ""
    min_parents: ClassVar[int] = 1
    max_parents: ClassVar[int | None] = 1

    def __init__(self, config: MethodConfig | None = None, **overrides: Any):
        self.config = config if config is not None else make_config(self.Config, overrides)

    def build(self, ctx: "BoostContext") -> Ensemble:  # pragma: no cover - interface
        raise NotImplementedError


def make_config(cls: type[MethodConfig], values: dict[str, Any]) -> MethodConfig:
    """Build ``cls`` from ``values``, rejecting unknown names with the list of valid ones."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        flags = ", ".join("--" + n.replace("_", "-") for n in sorted(names))
        raise PosthocError(f"unknown option {', '.join('--' + u.replace('_', '-') for u in unknown)}; this method takes {flags}")
    config = cls(**values)
    validate = getattr(config, "validate", None)
    if callable(validate):
        validate()
    return config


@dataclass
class BoostContext:
    """What a method may use: parents, data, device, and a way to report progress.

    ``train`` is the training split (fine-tuning only), ``select`` the validation part a method tunes
    and selects on. A method never sees the data results are reported on.
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
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def parent(self) -> nn.Module:
        return self.parents[0]

    def train_loader(self, batch_size: int = 128, *, shuffle: bool = True, seed: int = 0, augment: str = "light", subset: int | None = None):
        """Training images (with ``augment``: light, timm or none) in a seeded order."""
        return self.make_train_loader(batch_size=batch_size, shuffle=shuffle, seed=seed, augment=augment, subset=subset)

    def select_loader(self, batch_size: int = 256, *, subset: int | None = None):
        """The select part of the validation split, in a fixed order, eval transform."""
        return self.make_select_loader(batch_size=batch_size, subset=subset)

    def note(self, key: str, value: Any) -> None:
        """Record a measured quantity (e.g. the sigma found) in the artifact's config."""
        self.notes[key] = value


def batches(loader: Iterable, steps: int) -> Iterator:
    """Cycle ``loader`` for exactly ``steps`` batches (fractional epochs)."""
    return itertools.islice(itertools.chain.from_iterable(itertools.repeat(loader)), steps)


class Stopwatch:
    """Wall seconds since creation."""

    def __init__(self):
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start
