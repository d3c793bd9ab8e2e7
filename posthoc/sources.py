"""Model sources: turn one spec string into a ready ``torch.nn.Module``.

Every command that takes a model accepts the same spec:

==============================  ===========================================================
``resnet50``                    a timm architecture, with timm's default pretrained weights
``resnet50.a1_in1k``            a timm architecture with a pretrained tag
``hf-hub:org/name[@rev]``       a timm model on the Hugging Face Hub, or a posthoc artifact pushed there
``local-dir:PATH`` or ``PATH``  a directory in timm's Hub layout, or a posthoc artifact
``weights.safetensors``         a weights file (also ``.pth``, ``.pt``, ``.bin``); needs ``arch``
==============================  ===========================================================

Hub downloads go through timm and huggingface_hub, so a filled cache works with ``HF_HUB_OFFLINE=1``.
The returned model carries its preprocessing in ``model.pretrained_cfg`` (timm's convention);
:func:`timm_config` gives the JSON config (timm's Hub ``config.json``) that rebuilds its architecture
and :func:`build_from_timm_config` rebuilds it.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from .errors import PosthocError
from .hub import first_line, hub_config, hub_errors, is_artifact_config, split_repo

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    pretrained: bool = True,
) -> nn.Module:
    """Load a classifier from a spec string (see the module docstring for the accepted forms).

    Args:
        spec: timm name (optionally with a pretrained tag), ``hf-hub:org/name``, ``local-dir:PATH``,
            a directory in timm's Hub layout, a posthoc artifact directory, or a weights file.
        arch: timm architecture name; required for a bare weights file, ignored otherwise.
        num_classes: re-head the model to this many classes (a new, randomly initialised classifier)
            when its checkpoint has a different label space.
        pretrained: load weights (timm names only; ``False`` gives a randomly initialised model).

    Returns:
        The model in eval mode, with ``pretrained_cfg`` (its preprocessing).

    Raises:
        PosthocError: a one-line, user-fixable problem (unknown name, missing or corrupt weights,
            weights that do not fit the architecture, Hub files absent from an offline cache).
    """
    path = Path(spec.removeprefix("local-dir:"))
    if spec.startswith("local-dir:") or path.is_dir():
        if _is_artifact(path):
            from .artifact import load

            return _check_not_reheaded(load(path), spec, num_classes)
        model = _load_hub_layout_dir(path)
    elif path.suffix.lower() in WEIGHT_SUFFIXES or path.is_file():
        model = _load_weights_file(path, arch)
    elif spec.startswith(("hf-hub:", "hf_hub:")):
        model = _load_from_hub(spec)
        if getattr(model, "returns_probabilities", False):  # an artifact pushed to the Hub
            return _check_not_reheaded(model, spec, num_classes)
    else:
        model = _load_timm_name(spec, pretrained)
    if num_classes is not None and num_classes != model.num_classes:
        _reset_head(model, num_classes)
    return model.eval()


def _check_not_reheaded(artifact: nn.Module, spec: str, num_classes: int | None) -> nn.Module:
    if num_classes is not None and num_classes != artifact.num_classes:
        raise PosthocError(
            f"{spec} is an ensemble artifact of {artifact.num_classes} classes and cannot be re-headed to "
            f"{num_classes}; drop --num-classes, or boost the checkpoint it was built from with it"
        )
    return artifact


def member_name(spec: str) -> str:
    """A short name for a model spec: its directory or file name, or the spec itself."""
    name = Path(spec.removeprefix("local-dir:").removeprefix("hf-hub:").rstrip("/")).name
    return name or spec


def is_artifact(spec: str) -> bool:
    """True when ``spec`` names a posthoc ensemble artifact directory."""
    return _is_artifact(Path(spec.removeprefix("local-dir:")))


def _is_artifact(path: Path) -> bool:
    cfg = path / "config.json"
    if not cfg.is_file():
        return False
    try:
        return is_artifact_config(json.loads(cfg.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# --------------------------------------------------------------------------------------- timm names
def _load_timm_name(name: str, pretrained: bool) -> nn.Module:
    if ":" in name or "/" in name or "\\" in name:
        raise PosthocError(
            f"model '{name}' is neither an existing path nor a timm name; check the path, "
            f"or use 'hf-hub:{name}' for a Hub repository"
        )
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise PosthocError(f"unknown model '{name}'{_suggest(arch)}")
    if pretrained and tag and not timm.models.is_model_pretrained(name):
        tags = [n for n in timm.list_pretrained(f"{arch}.*")]
        hint = f"; available: {', '.join(tags[:6])}" if tags else "; this architecture has no pretrained weights"
        raise PosthocError(f"unknown pretrained tag '{tag}' for '{arch}'{hint}")
    if pretrained and not timm.models.is_model_pretrained(name):
        raise PosthocError(
            f"timm has no pretrained weights for '{name}'; pass a weights file with --arch {arch}, "
            "or pick a pretrained variant (timm.list_pretrained())"
        )
    try:
        with hub_errors(name):
            model = timm.create_model(name, pretrained=pretrained)
    except PosthocError:
        raise
    except RuntimeError as e:  # mismatched cached weights and the like
        raise PosthocError(f"could not load pretrained weights for '{name}': {first_line(e)}") from e
    return model


def _suggest(arch: str) -> str:
    close = difflib.get_close_matches(arch, timm.list_models(), n=3, cutoff=0.6)
    if close:
        return f"; did you mean {', '.join(close)}? (timm.list_models() lists all)"
    return "; see timm.list_models() for the names timm knows"


# ------------------------------------------------------------------------------------ Hub and dirs
def _load_from_hub(spec: str) -> nn.Module:
    """A timm model on the Hub, or a posthoc artifact pushed there (its config.json says which)."""
    repo, revision = split_repo(spec)
    if is_artifact_config(hub_config(repo, revision)):
        from .artifact import load

        return load(spec)
    with hub_errors(repo):
        return timm.create_model(f"hf-hub:{spec.split(':', 1)[1]}", pretrained=True)


def _load_hub_layout_dir(path: Path) -> nn.Module:
    """A directory with ``config.json`` + weights, as ``timm.models.push_to_hf_hub`` writes it."""
    if not path.is_dir():
        raise PosthocError(f"model directory {path} does not exist; check the path")
    if not (path / "config.json").is_file():
        raise PosthocError(
            f"{path} has no config.json; a model directory needs timm's Hub layout "
            "(config.json + model.safetensors), or pass a weights file with --arch"
        )
    weights = next((path / f for f in HUB_WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise PosthocError(
            f"{path} has no weights file ({' or '.join(HUB_WEIGHT_FILES[:2])}); copy the weights next to config.json"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PosthocError(f"{path / 'config.json'} is not valid JSON ({first_line(e)}); fix or regenerate it") from e
    model = build_from_timm_config(config, source=str(path / "config.json"))
    load_weights(model, read_state_dict(weights), source=str(weights))
    return model


def timm_config(model: nn.Module) -> dict[str, Any]:
    """The timm Hub ``config.json`` of ``model``: architecture, ``model_args`` and ``pretrained_cfg``.

    Written by timm's own ``save_config_for_hf``, so it records the construction arguments timm
    tracks (``num_classes``, ``img_size``, ``global_pool`` ...) and the preprocessing.
    """
    import tempfile

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
        raise PosthocError(f"{source} names unknown architecture '{arch}'{_suggest(arch)}")
    return timm.create_model(arch, pretrained=False, pretrained_cfg=pretrained_cfg, **model_args)


# ------------------------------------------------------------------------------------ weights files
def _load_weights_file(path: Path, arch: str | None) -> nn.Module:
    if not path.is_file():
        raise PosthocError(f"weights file {path} does not exist; check the path")
    if not arch:
        raise PosthocError(f"{path.name} is a bare weights file; also pass --arch NAME (the timm architecture)")
    if not timm.is_model(arch):
        raise PosthocError(f"unknown architecture '{arch}'{_suggest(arch)}")
    state_dict = read_state_dict(path)
    model = timm.create_model(arch, pretrained=False)
    classes = _checkpoint_num_classes(model, state_dict)
    if classes is not None and classes != model.num_classes:
        model = timm.create_model(arch, pretrained=False, num_classes=classes)
    load_weights(model, state_dict, source=str(path))
    return model


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
        raise PosthocError(
            f"cannot read weights file {path}: {first_line(e)}; the file is corrupt, truncated or not a "
            "PyTorch checkpoint (pickled objects other than tensors are refused for safety)"
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
        if missing:
            parts.append(f"missing {', '.join(missing[:3])}" + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else ""))
        if unexpected:
            parts.append(
                f"unexpected {', '.join(unexpected[:3])}" + (f" (+{len(unexpected) - 3} more)" if len(unexpected) > 3 else "")
            )
        arch = getattr(model, "pretrained_cfg", {}).get("architecture", type(model).__name__)
        raise PosthocError(f"weights in {source} do not fit architecture '{arch}': {'; '.join(parts)}; check --arch")
    model.load_state_dict(state_dict, strict=True)


def _checkpoint_num_classes(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> int | None:
    classifier = model.pretrained_cfg.get("classifier")
    names = classifier if isinstance(classifier, (list, tuple)) else [classifier]
    for name in names:
        weight = state_dict.get(f"{name}.weight")
        if weight is not None:
            return int(weight.shape[0])
    return None


def _reset_head(model: nn.Module, num_classes: int) -> None:
    model.reset_classifier(num_classes)
    cfg = dict(model.pretrained_cfg)
    cfg["num_classes"] = num_classes
    cfg.pop("label_names", None)
    model.pretrained_cfg = model.default_cfg = cfg
