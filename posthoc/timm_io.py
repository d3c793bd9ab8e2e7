"""timm model configs, weights files and block structure: what every layer above builds on.

- :func:`timm_config` / :func:`build_from_timm_config`: a model's timm Hub ``config.json`` (architecture,
  ``model_args``, ``pretrained_cfg``) and a fresh model from one;
- :func:`read_state_dict` / :func:`load_weights`: checkpoints read safely (safetensors, or pickles with
  ``weights_only=True``) and copied into a model with the mismatching keys named;
- :func:`last_layers`: the one rule every method uses for "the last N layers" (timm's parameter groups).

This module knows nothing of artifacts, the Hub or model specs.
"""

from __future__ import annotations

import difflib
import json
import tempfile
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import PosthocError, first_line


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


def build_from_timm_config(config: dict[str, Any], source: str = "config") -> nn.Module:
    """A randomly initialised model from a timm Hub config (as :func:`timm_config` writes it)."""
    from timm.models._hub import _parse_model_cfg

    try:
        pretrained_cfg, arch, model_args = _parse_model_cfg(json.loads(json.dumps(config)), {})
    except (KeyError, TypeError, AttributeError) as e:
        raise PosthocError(f"{source} is not a timm model config (missing {first_line(e)}); fix or regenerate it") from e
    if not timm.is_model(arch):
        raise PosthocError(f"{source} names unknown architecture '{arch}'{suggest_architecture(arch)}")
    return timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)


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
    return state


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
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append(f"shape mismatch in {', '.join(shapes[:3])}")
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
