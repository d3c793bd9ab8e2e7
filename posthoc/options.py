"""Declared options: every option posthoc takes, with its default, help text and accepted values.

A method's hyper-parameters and the option groups every command shares (:class:`DataOptions`,
:class:`ModelOptions`, :class:`PreprocessingOptions`, :class:`LoaderOptions`, :class:`OutputOptions`,
:class:`ViewOptions`) are
dataclasses whose fields are declared with :func:`option`. :func:`make_config` checks them all at once
(types, choices, bounds, finiteness), with a one-line error naming the flag; the command line generates
its flags from the same fields (:mod:`posthoc.cli_options`), and artifacts record the values. A field
renamed in this release keeps its old spelling for one release through ``renamed`` (a deprecation line
says what to write instead).
"""

from __future__ import annotations

import dataclasses
import math
import typing
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

from .errors import PosthocError

REQUIRED: Any = dataclasses.MISSING  # an option without a default (a required flag on the command line)


def option(
    default: Any,
    help: str,
    *,
    choices: tuple[str, ...] | None = None,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    short: str | None = None,
    metavar: str | None = None,
    check_type: bool = True,
    off_flag: str | None = None,
    role: str | None = None,
) -> Any:
    """A config field: its default (:data:`REQUIRED` for none), help text (shown by ``--help`` and ``posthoc
    methods``), the values it accepts (``choices``, bounds), and optionally a short flag (``-j``) and, for a
    switch, the flag that turns it off (default ``--no-NAME``).

    ``role`` marks a path option as an ``"input"`` (a file the command reads) or an ``"output"`` (one it
    writes): :func:`declared_paths` collects them, so the pipeline's rule that no output is, holds or lies
    in an input covers every path option without a list kept by hand.
    """
    if role not in (None, "input", "output"):
        raise ValueError(f"role must be 'input' or 'output', got {role!r}")
    meta = {
        "role": role,
        "help": help,
        "choices": choices,
        "ge": ge,
        "gt": gt,
        "le": le,
        "lt": lt,
        "short": short,
        "metavar": metavar,
        "check_type": check_type,
        "off_flag": off_flag,
    }
    if default is REQUIRED:
        return field(metadata=meta)
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


class Renamed(NamedTuple):
    """An option spelled differently in the previous release: its new field, how its value maps, and the
    old spelling on the command line when it is not the field's flag (a short flag such as ``-m``)."""

    new: str
    convert: Callable[[Any], Any] = lambda v: v
    note: str = ""
    spelling: str | None = None
    kind: type | None = None  # the old option's type where it differs from the new field's (a switch became a number)


@dataclass
class Options:
    """Base of every declared option set: checks that relate several fields, and old spellings."""

    renamed: ClassVar[dict[str, Renamed]] = {}
    panel: ClassVar[str] = ""  # the heading of the group's options in --help

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None and "help" in f.metadata:
                check_value(f.name, value, field_type(type(self), f.name), f.metadata)
        self.validate()

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


def declared_paths(config: Any, role: str) -> list[tuple[str, Path]]:
    """``(flag, path)`` of every option of ``config`` (an :class:`Options` instance) declared with ``role``
    (``"input"`` or ``"output"``) and given a value."""
    return [
        (flag(f.name), Path(getattr(config, f.name)))
        for f in dataclasses.fields(config)
        if f.metadata.get("role") == role and getattr(config, f.name) is not None
    ]


def flag(name: str) -> str:
    """The command-line spelling of a field: ``target_kl`` -> ``--target-kl``."""
    return "--" + name.replace("_", "-")


def field_type(cls: type, name: str) -> type:
    """The plain type of a field (``int | None`` -> ``int``)."""
    tp = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if args and typing.get_origin(tp) is not None else tp


def make_config(cls: type[Options], values: dict[str, Any], warn: Callable[[str], None] | None = None) -> Any:
    """Build ``cls`` from ``values``: old spellings mapped (with a deprecation line through ``warn``),
    unknown names rejected with the list of valid ones, every declared type, choice and bound checked."""

    def deprecated(message: str) -> None:
        warn(message) if warn else warnings.warn(message, FutureWarning, stacklevel=3)

    values = dict(values)
    for old, rename in cls.renamed.items():
        if old in values:
            new = rename.convert(values.pop(old))
            if new is False:
                instead = "--no-" + flag(rename.new)[2:]
            else:
                instead = flag(rename.new) + ("" if new is None or new is True else f" {new}")
            deprecated(
                f"{rename.spelling or flag(old)} is deprecated and goes away in the next release; use {instead}"
                + (f" ({rename.note})" if rename.note else "")
            )
            if new is not None:
                values.setdefault(rename.new, new)
    values = cls.upgrade(values, deprecated)
    values = cls.implied(values)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise PosthocError(
            f"unknown option {', '.join(flag(u) for u in unknown)}; this takes {', '.join(flag(n) for n in sorted(fields))}"
        )
    missing = [n for n, f in fields.items() if n not in values and f.default is REQUIRED and f.default_factory is REQUIRED]
    if missing:
        raise PosthocError(f"missing option {flag(missing[0])}")
    return cls(**values)  # every value checked against its declaration, then validate()


def check_value(name: str, value: Any, kind: type, meta: Any) -> None:
    """One field's value against its declared type, choices and bounds; a one-line error otherwise."""
    if not meta.get("check_type", True):
        return
    if kind is bool and not isinstance(value, bool):
        raise PosthocError(f"{flag(name)} is on or off, got '{value}'")
    if kind is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise PosthocError(f"{flag(name)} must be a whole number, got '{value}'")
    if kind is float and (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)):
        raise PosthocError(f"{flag(name)} must be a finite number, got '{value}'")
    if kind is str and not isinstance(value, (str, Path)):
        raise PosthocError(f"{flag(name)} must be text, got '{value}'")
    if kind is Path and not isinstance(value, (str, Path)):
        raise PosthocError(f"{flag(name)} must be a path, got '{value}'")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise PosthocError(f"{flag(name)} must be one of {', '.join(choices)}, got '{value}'")
    for key, ok, word in BOUNDS:
        bound = meta.get(key)
        if bound is not None and not ok(value, bound):
            raise PosthocError(f"{flag(name)} must be {word} {number_text(bound)}, got {value}")


def number_text(value: float) -> str:
    """A bound as people write it: ``4294967295`` for a whole number, ``0.001`` or ``1e-06`` for others."""
    return str(value) if isinstance(value, int) else f"{value:g}"


SEED = {"ge": 0, "le": 2**32 - 1}  # what every generator takes (numpy's limit); streams derive from it

BOUNDS = (
    ("ge", lambda v, b: v >= b, "at least"),
    ("gt", lambda v, b: v > b, "more than"),
    ("le", lambda v, b: v <= b, "at most"),
    ("lt", lambda v, b: v < b, "less than"),
)


def describe_options(cls: type[Options]) -> list[dict[str, Any]]:
    """Each field as ``name``, ``flag``, ``type``, ``default`` (:data:`REQUIRED` for none), ``help``,
    ``choices``, bounds, ``short`` and ``metavar`` (what ``posthoc methods NAME`` prints and the CLI turns
    into flags)."""
    out = []
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = REQUIRED
        out.append(
            {
                "name": f.name,
                "flag": flag(f.name),
                "type": field_type(cls, f.name),
                "default": default,
                **{k: f.metadata.get(k) for k in ("help", "choices", "ge", "gt", "le", "lt", "short", "metavar", "off_flag")},
            }
        )
    return out


# ------------------------------------------------------------------------------- shared option groups
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")
TTA_CHOICES = ("auto", "none", "flip")
# preprocessing values an option or a model's config may give (timm's configs stay well inside them)
PIXELS = {"ge": 1, "le": 4096}  # an input side
CROP_PCT = {"ge": 0.1, "le": 2.0}  # timm's configs use 0.875 to 1.15
MEAN_RANGE = (-10.0, 10.0)  # for images scaled to [0, 1]: 0.485, not 123.7
STD_RANGE = (1e-3, 10.0)


@dataclass
class DataOptions(Options):
    """Where the images are and which of them a command may use."""

    panel: ClassVar[str] = "Data"

    data: str = option(
        REQUIRED, "DATA/<split>/<class>/<image>, a .tar of one split, or hfds/NAME.", metavar="DATA", check_type=False
    )
    train_split: str = option("train", "Split a method may train on.", metavar="SPLIT")
    val_split: str = option(
        "val", "Split whose select part is tuned and selected on (its report part is never read).", metavar="SPLIT"
    )
    select_size: int | None = option(
        None, "Images in a split's select part (default: 40% of the split's images).", ge=1, metavar="N"
    )
    class_map: Path | None = option(
        None, "The data's class names in the model's class order, one per line (timm's format).", metavar="FILE", role="input"
    )
    skip_bad_images: bool = option(False, "Skip unreadable images (each named, counted at the end) instead of stopping.")
    subset: int | None = option(
        None, "A quick look: a fixed random sample of at most N images of each split read.", ge=1, metavar="N"
    )


@dataclass
class ModelOptions(Options):
    """How model specs are read."""

    panel: ClassVar[str] = "Model"

    arch: str | None = option(None, "timm architecture of a bare weights file.", metavar="NAME")
    num_classes: int | None = option(
        None, "Re-head the model to N classes (a new classifier, trained by the method).", ge=1, metavar="N"
    )


@dataclass
class PreprocessingOptions(Options):
    """Overrides of the model's own preprocessing (timm's ``pretrained_cfg``)."""

    panel: ClassVar[str] = "Preprocessing (default: the model's own)"

    img_size: int | None = option(None, "Override the input size (pixels).", **PIXELS, metavar="N")
    crop_pct: float | None = option(
        None, "Override the center-crop fraction of the resized image (above 1 pads, as timm does).", **CROP_PCT, metavar="F"
    )
    interpolation: str | None = option(None, "Override the resize interpolation.", choices=INTERPOLATIONS)
    mean: str | None = option(None, "Override the normalization mean, e.g. 0.5,0.5,0.5.", metavar="R,G,B")
    std: str | None = option(None, "Override the normalization std, e.g. 0.5,0.5,0.5.", metavar="R,G,B")

    def validate(self) -> None:
        for name, (low, high) in (("mean", MEAN_RANGE), ("std", STD_RANGE)):
            values = self.channels(name)
            if values is None:
                continue
            if len(values) not in (1, 3):
                raise PosthocError(f"--{name} needs one value per color channel (3, e.g. 0.5,0.5,0.5), got {len(values)}")
            if name == "std" and any(v <= 0 for v in values):
                raise PosthocError(f"--std values must be positive, got {self.std}")
            if any(not low <= v <= high for v in values):
                raise PosthocError(
                    f"--{name} values must be between {low:g} and {high:g} (for images scaled to [0, 1], e.g. "
                    f"{'0.485,0.456,0.406' if name == 'mean' else '0.229,0.224,0.225'}), got {getattr(self, name)}"
                )

    def channels(self, name: str) -> tuple[float, ...] | None:
        """``--mean`` / ``--std`` as numbers (finite ones only)."""
        text = getattr(self, name)
        if text is None:
            return None
        try:
            values = tuple(float(v) for v in str(text).split(","))
        except ValueError:
            raise PosthocError(f"--{name} must be comma-separated numbers like 0.5,0.5,0.5, got '{text}'") from None
        if not all(math.isfinite(v) for v in values):
            raise PosthocError(f"--{name} must be finite numbers like 0.5,0.5,0.5, got '{text}'")
        return values

    def overrides(self) -> dict[str, Any]:
        """The overrides as timm ``resolve_data_config`` arguments."""
        return {
            "img_size": self.img_size,
            "crop_pct": self.crop_pct,
            "interpolation": self.interpolation,
            "mean": self.channels("mean"),
            "std": self.channels("std"),
        }


@dataclass
class LoaderOptions(Options):
    """How images are batched and where the model runs."""

    panel: ClassVar[str] = "Loading and device"

    batch_size: int = option(256, "Images per batch.", ge=1, short="-b", metavar="N")
    workers: int | None = option(None, "DataLoader workers (default: spare cores).", ge=0, short="-j", metavar="N")
    device: str = option("auto", "auto, cpu or cuda (cuda:N).", metavar="DEVICE")


@dataclass
class OutputOptions(Options):
    """Where results go, and what the console shows."""

    panel: ClassVar[str] = "Output"

    out: Path | None = option(None, "Artifact directory to write.", short="-o", metavar="DIR")
    overwrite: bool = option(False, "Replace an existing artifact at --out.")
    progress: bool = option(True, "Show progress bars.")


@dataclass
class ViewOptions(Options):
    """Test-time views: the image and its mirror, averaged (chosen on the select part with ``auto``)."""

    panel: ClassVar[str] = "Test-time views"

    tta: str | None = option(
        "auto",
        "Test-time views: auto (keep the mirrored view where it lowers the cross-validated select NLL), none, or flip.",
        choices=TTA_CHOICES,
    )


# ------------------------------------------------------------------------------- commands' option sets
@dataclass(frozen=True)
class CommandOptions:
    """The declared options of one command: its groups, the fields it leaves out, and its own defaults.

    The command line generates the command's flags from it (:mod:`posthoc.cli_options`) and the command's
    Python function splits its keyword arguments with :meth:`split`, so both take exactly the same
    options with the same defaults and checks.
    """

    groups: tuple[type[Options], ...]
    exclude: frozenset[str] = frozenset()  # field names, in every group or as GROUP.FIELD
    defaults: tuple[tuple[str, Any], ...] = ()

    def fields(self, group: type[Options]) -> list[dict[str, Any]]:
        """:func:`describe_options` of ``group`` as this command takes them (excluded fields dropped,
        command defaults applied)."""
        defaults = dict(self.defaults)
        return [
            {**o, "default": defaults.get(o["name"], o["default"])}
            for o in describe_options(group)
            if o["name"] not in self.exclude and f"{group.__name__}.{o['name']}" not in self.exclude
        ]

    def names(self) -> set[str]:
        """Every field name (and old spelling) the command's groups take."""
        names = set()
        for group in self.groups:
            names |= {o["name"] for o in self.fields(group)} | set(group.renamed)
        return names

    def split(self, values: dict[str, Any], warn: Callable[[str], None] | None = None) -> tuple[dict[type, Any], dict[str, Any]]:
        """Build every group from ``values`` (command defaults for what is absent or ``None``) and return them
        by class, with the values no group takes (a method's options)."""
        defaults = dict(self.defaults)
        rest = dict(values)
        built: dict[type, Any] = {}
        for group in self.groups:
            names = {o["name"] for o in self.fields(group)} | set(group.renamed)
            given = {k: rest.pop(k) for k in list(rest) if k in names}
            given = {k: v for k, v in given.items() if v is not None}
            for name in names & set(defaults):
                given.setdefault(name, defaults[name])
            built[group] = make_config(group, given, warn=warn)
        return built, rest
