"""The small interface every method implements, its declared options, and the context ``boost`` hands it.

A method is a class with a ``name``, a ``Config`` dataclass of its hyper-parameters and a
``build(ctx)`` that returns an :class:`~posthoc.ensemble.Ensemble`. Each config field is declared with
:func:`option`: its default, help text, and the values it accepts (``choices``, bounds ``ge`` / ``gt``
/ ``le`` / ``lt``). :func:`make_config` checks them all once, with one-line errors naming the flag;
the CLI turns the same fields into ``posthoc boost --method NAME`` flags (``target_kl`` ->
``--target-kl``, booleans ``--x/--no-x``), and the whole config is recorded in the artifact. A field
renamed in this release keeps its old spelling for one release through ``Config.renamed``.
"""

from __future__ import annotations

import dataclasses
import math
import time
import typing
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch
from torch import nn

from .. import distributed
from ..ensemble import Ensemble
from ..errors import PosthocError


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
) -> Any:
    """A config field: its default, help text (shown by ``--help`` and ``posthoc methods``) and the values
    it accepts, checked by :func:`make_config`."""
    meta = {"help": help, "choices": choices, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Renamed(NamedTuple):
    """An option spelled differently in the previous release: its new field, and how its value maps."""

    new: str
    convert: Callable[[Any], Any] = lambda v: v
    note: str = ""


@dataclass
class MethodConfig:
    """Hyper-parameters shared by every method."""

    renamed: ClassVar[dict[str, Renamed]] = {}

    seed: int = option(0, "Random seed; the same seed gives a bit-identical artifact.")

    def validate(self) -> None:
        """Checks that relate several options (single-option checks are declared with :func:`option`)."""

    @classmethod
    def upgrade(cls, values: dict[str, Any], warn: Callable[[str], None]) -> dict[str, Any]:
        """Map option values of the previous release whose meaning changed (with a deprecation line)."""
        return values

    @classmethod
    def implied(cls, values: dict[str, Any]) -> dict[str, Any]:
        """Defaults that follow from the options given (e.g. a pruning option implies pruning); options
        given explicitly are never changed."""
        return values


def flag(name: str) -> str:
    """The command-line spelling of a config field: ``target_kl`` -> ``--target-kl``."""
    return "--" + name.replace("_", "-")


def field_type(cls: type, name: str) -> type:
    """The plain type of a config field (``int | None`` -> ``int``)."""
    tp = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args and typing.get_origin(tp) is not None else tp


def make_config(cls: type[MethodConfig], values: dict[str, Any], warn: Callable[[str], None] | None = None) -> MethodConfig:
    """Build ``cls`` from ``values``: old spellings mapped (with a deprecation line through ``warn``),
    unknown names rejected with the list of valid ones, every declared type, choice and bound checked."""

    def deprecated(message: str) -> None:
        warn(message) if warn else warnings.warn(message, FutureWarning, stacklevel=3)

    values = dict(values)
    for old, rename in cls.renamed.items():
        if old in values:
            new = rename.convert(values.pop(old))
            deprecated(
                f"{flag(old)} is deprecated and goes away in the next release; use {flag(rename.new)} {new}"
                + (f" ({rename.note})" if rename.note else "")
            )
            values.setdefault(rename.new, new)
    values = cls.upgrade(values, deprecated)
    values = cls.implied(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PosthocError(
            f"unknown option {', '.join(flag(u) for u in unknown)}; this method takes {', '.join(flag(n) for n in sorted(fields))}"
        )
    for name, value in values.items():
        if value is not None:
            check_value(name, value, field_type(cls, name), fields[name].metadata)
    config = cls(**values)
    config.validate()
    return config


def check_value(name: str, value: Any, kind: type, meta: Any) -> None:
    """One field's value against its declared type, choices and bounds; a one-line error otherwise."""
    if kind is bool and not isinstance(value, bool):
        raise PosthocError(f"{flag(name)} is on or off, got '{value}'")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PosthocError(f"{flag(name)} must be a whole number, got '{value}'")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise PosthocError(f"{flag(name)} must be a finite number, got '{value}'")
    if kind is str and not isinstance(value, str):
        raise PosthocError(f"{flag(name)} must be text, got '{value}'")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise PosthocError(f"{flag(name)} must be one of {', '.join(choices)}, got '{value}'")
    for key, ok, word in (
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ):
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise PosthocError(f"{flag(name)} must be {word} {bound:g}, got {value}")


def describe_options(cls: type[MethodConfig]) -> list[dict[str, Any]]:
    """Each config field as ``name``, ``flag``, ``type``, ``default``, ``help``, ``choices`` and bounds
    (what ``posthoc methods NAME`` prints and the CLI turns into flags)."""
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        out.append(
            {
                "name": f.name,
                "flag": flag(f.name),
                "type": field_type(cls, f.name),
                "default": default,
                **{k: f.metadata.get(k) for k in ("help", "choices", "ge", "gt", "le", "lt")},
            }
        )
    return out


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

    def includes_parent(self) -> bool:
        """Whether one member of what :meth:`build` returns is the unchanged parent (recorded in the artifact)."""
        return bool(getattr(self.config, "include_parent", False))

    def fit_budget(self, parents: list[nn.Module], budget: float, given: set[str]) -> list[str]:
        """Set this method's cost knobs so the artifact's forward FLOPs stay within ``budget`` times the
        parent's (:mod:`posthoc.cost`); options in ``given`` were set explicitly and are kept. Returns
        one line per choice made (or per explicit option that overrides the budget)."""
        raise PosthocError(f"method '{self.name}' does not take --inference-budget yet; drop it")

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
