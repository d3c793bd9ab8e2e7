"""timm model configs, weights files and block structure: what every layer above builds on.

- :func:`timm_config` / :func:`build_from_timm_config`: a model's timm Hub ``config.json`` (architecture,
  ``model_args``, ``pretrained_cfg``) and a fresh model from one. A config is data, not instructions:
  :func:`check_timm_config` type-checks every field it uses (:data:`TIMM_CONFIG`) and passes timm only
  architecture keywords (:func:`architecture_keywords`: what timm's model classes take, never
  ``pretrained``, ``checkpoint_path``, ``pretrained_cfg_overlay`` or anything else that loads a file),
  and the model is first built on the meta device, so a config describing far more elements than its
  weights hold is refused before any memory is allocated;
- :func:`read_state_dict` / :func:`load_weights`: checkpoints read safely (safetensors, or pickles with
  ``weights_only=True``), checked to hold finite numbers (:func:`check_finite`) and copied into a model
  with the mismatching keys, shapes or dtypes named;
- :func:`last_layers`: the one rule every method uses for "the last N layers" (timm's parameter groups).

This module knows nothing of artifacts, the Hub or model specs.
"""

from __future__ import annotations

import difflib
import functools
import json
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import PosthocError, first_line
from .options import CROP_PCT, INTERPOLATIONS, MEAN_RANGE, PIXELS, STD_RANGE
from .schema import (
    Anything,
    Either,
    Flag,
    Integer,
    Invalid,
    ListOf,
    MapOf,
    Maybe,
    Number,
    OneOf,
    Record,
    Spec,
    Text,
    Where,
    unique,
)
from .schema import check as check_fields

MAX_CLASSES = 1_000_000


# --------------------------------------------------------------------------------- config checks
SIZE = ListOf(Integer(ge=PIXELS["ge"], le=PIXELS["le"]), length=3)  # (channels, height, width)


def _channels_agree(cfg: dict[str, Any]) -> str | None:
    """For :data:`PRETRAINED_CFG`: ``mean`` and ``std`` give one value, or one per input channel."""
    channels = (cfg.get("input_size") or [3])[0]
    for key in ("mean", "std"):
        if key in cfg and len(cfg[key]) not in (1, channels):
            return f"an object whose {key} has 1 or {channels} values (one per input channel), not {len(cfg[key])}"
    return None


PRETRAINED_FIELDS = Record(
    optional={
        "input_size": SIZE,
        "test_input_size": Maybe(SIZE),
        "min_input_size": Maybe(SIZE),
        "fixed_input_size": Flag(),
        "interpolation": OneOf(*INTERPOLATIONS),
        "crop_pct": Number(**CROP_PCT),
        "test_crop_pct": Maybe(Number(**CROP_PCT)),
        "crop_mode": OneOf("center", "squash", "border"),
        "mean": ListOf(Number(ge=MEAN_RANGE[0], le=MEAN_RANGE[1]), min_len=1, max_len=4),
        "std": ListOf(Number(ge=STD_RANGE[0], le=STD_RANGE[1]), min_len=1, max_len=4),
        "num_classes": Integer(ge=0, le=MAX_CLASSES),
        "label_names": Where(ListOf(Text(max_len=1000), max_len=MAX_CLASSES), unique),
        "classifier": Either(Text(), ListOf(Text())),
        "first_conv": Either(Text(), ListOf(Text())),
        "pool_size": Maybe(ListOf(Integer(ge=0))),
        "architecture": Text(r"[A-Za-z0-9_]+", "a timm architecture name"),
    }
)
PRETRAINED_CFG = Where(PRETRAINED_FIELDS, _channels_agree)
"""The ``pretrained_cfg`` fields posthoc and timm's data pipeline read; others (``license``, ``paper_ids``,
``hf_hub_id`` ...) are descriptive and never used (models are built with ``pretrained=False``)."""


class ModelArgs(Spec):
    """``model_args``: architecture keywords only (:func:`architecture_keywords`), each a JSON number,
    text without a path separator, true/false, null, or a list of those."""

    what = "an object of architecture keywords"
    VALUE = Either(
        Number(),
        Flag(),
        Text(r"[^/\\]*", "text without a path separator", max_len=200),
        ListOf(Either(Number(), Flag(), Text(r"[^/\\]*", "text", max_len=200), ListOf(Number(), max_len=64)), max_len=64),
    )

    def check(self, value: Any, name: str) -> Any:
        """Every key an architecture keyword, every value plain data."""
        if not isinstance(value, dict):
            self.fail(value, name, "an object")
        allowed = architecture_keywords()
        for key, item in value.items():
            if key not in allowed:
                raise Invalid(
                    f"{name}.{key}",
                    "absent: posthoc passes timm architecture keywords only (no weights, checkpoints, paths or overlays)",
                    item,
                )
            if item is not None:
                self.VALUE.check(item, f"{name}.{key}")
        return value


TIMM_CONFIG = Record(
    required={"architecture": Text(r"[A-Za-z0-9_]+", "a timm architecture name"), "pretrained_cfg": PRETRAINED_CFG},
    optional={
        "num_classes": Integer(ge=0, le=MAX_CLASSES),
        "num_features": Integer(ge=0),
        "global_pool": Maybe(Text(max_len=100)),
        "label_names": Where(ListOf(Text(max_len=1000), max_len=MAX_CLASSES), unique),
        "label_descriptions": Either(MapOf(Anything()), ListOf(Anything())),
        "model_args": ModelArgs(),
    },
)
"""A timm Hub ``config.json`` (``save_config_for_hf``'s layout) as posthoc reads it."""

# keywords of timm's factory and builder, and model-class arguments that take modules or load things
NOT_ARCHITECTURE = frozenset(
    {
        "pretrained",
        "pretrained_cfg",
        "pretrained_cfg_overlay",
        "pretrained_strict",
        "pretrained_model_args",
        "checkpoint_path",
        "cache_dir",
        "features_only",
        "feature_cfg",
        "feature_cls",
        "kwargs_filter",
        "scriptable",
        "exportable",
        "no_jit",
        "device",
        "dtype",
        "cfg",
        "cfgs",
        "block_args",
        "hybrid_backbone",
        "stem_backbone",
        "use_checkpoint",
        "model_args",
    }
)


@functools.lru_cache(maxsize=1)
def architecture_keywords() -> frozenset[str]:
    """The keywords ``model_args`` may pass to timm: the constructor arguments of timm's model classes
    (those with ``forward_features``), less :data:`NOT_ARCHITECTURE`."""
    import inspect
    import sys

    names: set[str] = set()
    for module_name, module in list(sys.modules.items()):
        if not module_name.startswith("timm.models.") or module is None:
            continue
        for obj in list(vars(module).values()):
            if inspect.isclass(obj) and issubclass(obj, nn.Module) and hasattr(obj, "forward_features"):
                try:
                    params = inspect.signature(obj.__init__).parameters.values()
                except (TypeError, ValueError):
                    continue
                names |= {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    names |= {"num_classes", "in_chans", "global_pool", "img_size", "drop_rate", "drop_path_rate"}
    return frozenset(n for n in names if n != "self" and n not in NOT_ARCHITECTURE)


def check_timm_config(config: Any, source: str) -> dict[str, Any]:
    """A timm Hub config (``source`` names it in errors) as ``{"architecture", "pretrained_cfg", ...}``:
    a legacy single-dict config is split as timm does, then every field is checked against
    :data:`TIMM_CONFIG`. Returns a copy; the input is not changed."""
    if not isinstance(config, dict):
        kind = {list: "a list", str: "text", type(None): "null"}.get(type(config), "a number")
        raise PosthocError(f"{source} must hold a JSON object (a timm model config), not {kind}; fix or regenerate it")
    config = json.loads(json.dumps(config))
    if "pretrained_cfg" not in config and "architecture" in config:  # legacy: one dict, as timm still reads
        pretrained_cfg = dict(config)
        config = {"architecture": pretrained_cfg.pop("architecture"), "pretrained_cfg": pretrained_cfg}
        if "labels" in pretrained_cfg:
            pretrained_cfg["label_names"] = pretrained_cfg.pop("labels")
    return check_fields(config, TIMM_CONFIG, source)


def timm_config(model: nn.Module) -> dict[str, Any]:
    """The timm Hub ``config.json`` of ``model``: architecture, ``model_args`` and ``pretrained_cfg``.

    Written by timm's own ``save_config_for_hf``, so it records the construction arguments timm
    tracks (``num_classes``, ``img_size``, ``global_pool`` ...) and the preprocessing.
    """
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        file = Path(tmp) / "config.json"
        save_config_for_hf(model, str(file))
        return json.loads(file.read_text())


def build_from_timm_config(config: dict[str, Any], source: str = "config", elements: int | None = None) -> nn.Module:
    """A randomly initialised model from a timm Hub config (as :func:`timm_config` writes it), checked by
    :func:`check_timm_config` first.

    ``elements``: how many numbers the weights to load hold; a config describing many more (a huge
    ``num_classes`` or width) is refused after a build on the meta device, before any memory is used.
    Whatever timm cannot build from the config (a keyword this architecture does not take, a value it
    refuses) is one line naming ``source``.
    """
    from timm.models._hub import _parse_model_cfg

    config = check_timm_config(config, source)
    pretrained_cfg, arch, model_args = _parse_model_cfg(config, {})
    if not timm.is_model(arch):
        raise PosthocError(f"{source} names unknown architecture '{arch}'{suggest_architecture(arch)}")

    def create() -> nn.Module:
        return timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)

    try:
        if elements is not None:
            with torch.device("meta"):
                described = sum(t.numel() for t in create().state_dict().values())
            if described > 2 * elements + 1_000_000:
                raise PosthocError(
                    f"{source} describes a {arch} of {described} numbers but its weights hold {elements}; "
                    "the config does not belong to these weights"
                )
        return create()
    except PosthocError:
        raise
    except (TypeError, ValueError, AssertionError, RuntimeError, KeyError, IndexError, AttributeError, NotImplementedError) as e:
        raise PosthocError(
            f"{source}: timm cannot build '{arch}' from it ({first_line(e)[:200]}); fix or regenerate it"
        ) from None


def suggest_architecture(arch: str) -> str:
    """``"; did you mean ..."`` for a misspelt timm architecture (or where to find the names)."""
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {', '.join(close)}? (timm.list_models() lists all)"
    return "; see timm.list_models() for the names timm knows"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint safely: safetensors, or ``torch.load(weights_only=True)`` for pickles.

    Unwraps ``state_dict`` / ``model`` / EMA wrappers and ``module.`` prefixes (timm's
    ``load_state_dict`` rules, which prefer EMA weights when a training checkpoint holds both).
    """
    from timm.models import load_state_dict

    path = Path(path)
    try:
        state = load_state_dict(str(path), weights_only=True)
    except Exception as e:  # safetensors / pickle / zip errors all mean "unreadable file"
        reason = (
            "it holds Python objects other than tensors, which posthoc refuses to unpickle for safety"
            if "Unsupported global" in str(e)
            else "it is corrupt, truncated or not a PyTorch or safetensors checkpoint"
        )
        raise PosthocError(
            f"cannot read weights file {path}: {reason}; save model.state_dict() with torch.save or safetensors"
        ) from e
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PosthocError(f"{path} does not hold a state dict of tensors; save model.state_dict() instead")
    check_finite(state, f"weights file {path}")
    return state


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """One line when a floating tensor of ``tensors`` holds NaN or infinity (no weights legitimately do):
    how many values, in how many tensors, the first named."""
    bad = {}
    for name, t in tensors.items():
        if t.is_floating_point() or t.is_complex():
            n = int((~torch.isfinite(t)).sum())
            if n:
                bad[name] = n
    if bad:
        first = next(iter(bad))
        raise PosthocError(
            f"{source} holds {sum(bad.values())} non-finite value(s) (NaN or infinity) in {len(bad)} tensor(s), "
            f"first {first}; the weights are damaged: restore or retrain them"
        )


def load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """Copy ``state_dict`` into ``model``, failing with the first mismatching keys named."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shapes = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    kinds = [
        f"{k} stored as {str(state_dict[k].dtype).removeprefix('torch.')} for a {str(v.dtype).removeprefix('torch.')} tensor"
        for k, v in own.items()
        if k in state_dict and state_dict[k].is_floating_point() != v.is_floating_point()
    ]
    if missing or unexpected or shapes or kinds:
        parts = []
        if shapes:
            parts.append(f"shape mismatch in {', '.join(shapes[:3])}")
        if kinds:
            parts.append(f"{', '.join(kinds[:3])}")
        for label, keys in (("missing", missing), ("unexpected", unexpected)):
            if keys:
                more = f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""
                parts.append(f"{label} {', '.join(keys[:3])}{more}")
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise PosthocError(f"weights in {source} do not fit architecture '{arch}': {'; '.join(parts)}; check --arch")
    model.load_state_dict(state_dict, strict=True)


def checkpoint_num_classes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    """Classes of the classifier stored in ``state_dict`` (``model`` names the classifier), if found."""
    classifier = model.pretrained_cfg.get("classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def reset_head(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a new, randomly initialised classifier of ``num_classes`` (label names dropped)."""
    model.reset_classifier(num_classes)
    cfg = dict(model.pretrained_cfg)
    cfg["num_classes"] = num_classes
    cfg.pop("label_names", None)
    model.pretrained_cfg = model.default_cfg = cfg


def last_layers(model: nn.Module, n: int) -> list[list[str]]:
    """Parameter names of the last ``n`` layers, last first: layer 1 is the classifier, layer 2 the last block.

    Layers are timm's parameter groups (``group_matcher(coarse=False)``, timm's own block structure):
    the last group holds the classifier (and whatever timm leaves unassigned), the groups before it
    are the blocks, and the first is the stem, which is never counted. ``n = 0`` gives ``[]``. Every
    method that touches "the last N layers" (noisy and sparse ``--last-layers``, lastlayer and
    supernet retraining) counts them this way.
    """
    from timm.models._manipulate import group_parameters

    if n == 0:
        return []
    if not hasattr(model, "group_matcher"):
        if n > 1:
            raise PosthocError(f"{type(model).__name__} does not describe its blocks (no group_matcher); use --last-layers 1")
        classifier = model.get_classifier()
        owner = next(name for name, m in model.named_modules() if m is classifier)
        return [[f"{owner}.{p}" for p, _ in classifier.named_parameters()]]
    groups = [list(g) for g in group_parameters(model, model.group_matcher(coarse=False)).values()]
    if n > len(groups) - 1:
        raise PosthocError(
            f"--last-layers {n} is more than this model has: the classifier and {len(groups) - 2} blocks "
            f"(at most --last-layers {len(groups) - 1})"
        )
    return [groups[-i] for i in range(1, n + 1)]


def layer_count(model: nn.Module) -> int:
    """How many layers :func:`last_layers` can count in ``model`` (the classifier and the blocks)."""
    from timm.models._manipulate import group_parameters

    if not hasattr(model, "group_matcher"):
        return 1
    return len(group_parameters(model, model.group_matcher(coarse=False))) - 1
