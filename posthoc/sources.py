"""Model sources: the one place that turns a spec string into a ready ``torch.nn.Module``.

Every command that takes a model accepts the same spec:

==============================  ===========================================================
``resnet50``                    a timm architecture, with timm's default pretrained weights
``resnet50.a1_in1k``            a timm architecture with a pretrained tag
``hf-hub:org/name[@rev]``       a timm model on the Hugging Face Hub, or a posthoc artifact pushed there
``local-dir:PATH`` or ``PATH``  a directory in timm's Hub layout, or a posthoc artifact
``weights.safetensors``         a weights file (also ``.pth``, ``.pt``, ``.bin``); needs ``arch``
==============================  ===========================================================

Hub downloads go through timm and huggingface_hub, so a filled cache works with ``HF_HUB_OFFLINE=1``.
The returned model carries its preprocessing in ``model.pretrained_cfg`` (timm's convention).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path

import timm
import torch
from torch import nn

from . import artifact, hub
from .errors import PosthocError, first_line
from .fused import EnsembleModule
from .paths import read_json_file, read_text_file
from .timm_io import (
    PRETRAINED_FIELDS,
    build_from_timm_config,
    check_timm_config,
    checkpoint_num_classes,
    load_weights,
    read_state_dict,
    reset_head,
    suggest_architecture,
)

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".ckpt")
HUB_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth")


def load_model(
    spec: str,
    *,
    arch: str | None = None,
    num_classes: int | None = None,
    pretrained: bool = True,
    warn: Callable[[str], None] | None = None,
) -> nn.Module:
    """Load a classifier, or an ensemble artifact, from a spec string (see the module docstring).

    Args:
        spec: timm name (optionally with a pretrained tag), ``hf-hub:org/name``, ``local-dir:PATH``,
            a directory in timm's Hub layout, a posthoc artifact directory, or a weights file.
        arch: timm architecture name; required for a bare weights file, ignored otherwise.
        num_classes: re-head the model to this many classes (a new, randomly initialised classifier)
            when its checkpoint has a different label space.
        pretrained: load weights (timm names only; ``False`` gives a randomly initialised model).
        warn: where a one-line warning goes (a bare weights file whose preprocessing is assumed).

    Returns:
        The model in eval mode, with ``pretrained_cfg`` (its preprocessing); for an artifact, its
        :class:`~posthoc.fused.EnsembleModule`.

    Raises:
        PosthocError: a one-line, user-fixable problem (unknown name, missing or corrupt weights,
            weights that do not fit the architecture, Hub files absent from an offline cache).
    """
    path = Path(spec.removeprefix("local-dir:"))
    if spec.startswith("local-dir:") or path.is_dir():
        if artifact.is_artifact_dir(path):
            return _not_reheaded(artifact.load(path, name=spec), spec, num_classes)
        model = _load_hub_layout_dir(path)
    elif path.suffix.lower() in WEIGHT_SUFFIXES or path.is_file():
        model = _load_weights_file(path, arch, warn)
    elif hub.is_hub_spec(spec):
        repo, revision = hub.split_repo(spec)
        if artifact.is_artifact_config(hub.hub_config(repo, revision)):
            return _not_reheaded(load_artifact(spec), spec, num_classes)
        # a timm model on the Hub: its files through the cache, read as a local directory in timm's Hub
        # layout, so its config.json gets the checks every config gets
        model = _load_hub_layout_dir(hub.download(repo, revision, ["config.json", *HUB_WEIGHT_FILES]), name=spec)
    else:
        model = _load_timm_name(spec, pretrained)
    if num_classes is not None and num_classes != model.num_classes:
        reset_head(model, num_classes)
    return model.eval()


def expand_specs(specs: list[str], model_list: str | Path | None = None) -> list[str]:
    """Model specs from the command line and a model list (one per line, ``#`` comments), with timm-style
    wildcards (``resnet5*.a1_in1k``) expanded over timm's pretrained names, as timm's ``validate.py``."""
    out = list(specs)
    if model_list is not None:
        text = read_text_file(model_list, "model list", "give a text file with one model spec per line")
        out += [line.split("#", 1)[0].strip() for line in text.splitlines()]
    expanded: list[str] = []
    for spec in filter(None, out):
        if any(c in spec for c in "*?[") and not Path(spec).exists():
            names = timm.list_pretrained(spec)
            if not names:
                raise PosthocError(f"no timm pretrained model matches '{spec}'; see timm.list_pretrained()")
            expanded += names
        else:
            expanded.append(spec)
    if not expanded:
        raise PosthocError("no model to evaluate; give model specs or --model-list FILE")
    return list(dict.fromkeys(expanded))


def load_artifact(spec: str | Path, strategy: str = "auto", fold_bn: bool = True) -> EnsembleModule:
    """Load an ensemble artifact as one ``torch.nn.Module`` (this is ``posthoc.load``).

    ``spec`` is an artifact directory, ``local-dir:PATH``, or ``hf-hub:org/name[@rev]`` for one pushed
    with ``posthoc push`` (downloaded through the Hugging Face cache). ``strategy`` and ``fold_bn`` are
    :class:`~posthoc.fused.EnsembleModule`'s. ``forward(x)`` returns the ensemble's class probabilities
    (B, C); ``forward(x, return_members=True)`` also per-member probabilities (K, B, C). The module is
    in eval mode and carries ``pretrained_cfg`` (preprocessing) and ``posthoc_config`` (the config.json).
    """
    return artifact.load(artifact_dir(spec), strategy=strategy, fold_bn=fold_bn, name=str(spec))


def artifact_dir(spec: str | Path) -> Path:
    """The local directory of an artifact spec (``PATH``, ``local-dir:PATH``, or ``hf-hub:org/name[@rev]``,
    whose artifact files are downloaded through the Hugging Face cache)."""
    spec = str(spec)
    if not hub.is_hub_spec(spec):
        return Path(spec.removeprefix("local-dir:"))
    repo, revision = hub.split_repo(spec)
    if not artifact.is_artifact_config(hub.hub_config(repo, revision)):
        raise PosthocError(f"Hub repository '{repo}' holds a timm model, not a posthoc artifact; load it with posthoc.load_model")
    return hub.download(repo, revision, list(artifact.FILES))


def is_artifact(spec: str) -> bool:
    """True when ``spec`` names a posthoc artifact: a local artifact directory, or a Hub repository whose
    ``config.json`` is an artifact's (fetched once, or read from the cache)."""
    if hub.is_hub_spec(spec):
        return artifact.is_artifact_config(hub.hub_config(*hub.split_repo(spec)))
    return artifact.is_artifact_dir(Path(spec.removeprefix("local-dir:")))


def member_name(spec: str) -> str:
    """A short name for a model spec: its directory or file name, or the spec itself."""
    name = Path(spec.removeprefix("local-dir:").removeprefix("hf-hub:").rstrip("/")).name
    return name or spec


def floating_dtype(state_dict: dict) -> torch.dtype:
    """The dtype most floating tensors of a checkpoint are stored in (artifacts keep it by default)."""
    counts: dict[torch.dtype, int] = {}
    for t in state_dict.values():
        if t.is_floating_point():
            counts[t.dtype] = counts.get(t.dtype, 0) + t.numel()
    return max(counts, key=counts.get) if counts else torch.float32


def storage_dtype(models: list[nn.Module], requested: str = "auto") -> torch.dtype:
    """The dtype an artifact stores its floating tensors in: ``requested``, or (``auto``) the widest dtype its
    parents' checkpoints were stored in (float32 for timm names, whose files posthoc does not read)."""
    from .runtime import resolve_dtype

    if requested != "auto":
        return resolve_dtype(requested)
    dtypes = [getattr(m, "checkpoint_dtype", torch.float32) for m in models]
    return max(dtypes, key=lambda d: torch.finfo(d).bits + (0.5 if d == torch.float16 else 0))


def _not_reheaded(module: EnsembleModule, spec: str, num_classes: int | None) -> EnsembleModule:
    if num_classes is not None and num_classes != module.num_classes:
        raise PosthocError(
            f"{spec} is an ensemble artifact of {module.num_classes} classes and cannot be re-headed to "
            f"{num_classes}; drop --num-classes, or boost the checkpoint it was built from with it"
        )
    return module


# --------------------------------------------------------------------------------------- timm names
def _load_timm_name(name: str, pretrained: bool) -> nn.Module:
    if ":" in name or "/" in name or "\\" in name:
        raise PosthocError(
            f"model '{name}' is neither an existing path nor a timm name; check the path, "
            f"or use 'hf-hub:{name}' for a Hub repository"
        )
    arch, _, tag = name.partition(".")
    if not timm.is_model(arch):
        raise PosthocError(f"unknown model '{name}'{suggest_architecture(arch)}")
    if pretrained and tag and not timm.models.is_model_pretrained(name):
        tags = list(timm.list_pretrained(f"{arch}.*"))
        hint = f"; available: {', '.join(tags[:6])}" if tags else "; this architecture has no pretrained weights"
        raise PosthocError(f"unknown pretrained tag '{tag}' for '{arch}'{hint}")
    if pretrained and not timm.models.is_model_pretrained(name):
        raise PosthocError(
            f"timm has no pretrained weights for '{name}'; pass a weights file with --arch {arch}, "
            "or pick a pretrained variant (timm.list_pretrained())"
        )
    try:
        with hub.hub_errors(name):
            if pretrained:
                hub.prepare()
            return timm.create_model(name, pretrained=pretrained)
    except RuntimeError as e:  # mismatched cached weights and the like
        raise PosthocError(f"could not load pretrained weights for '{name}': {first_line(e)}") from e


# ------------------------------------------------------------------------------------ directories
def _load_hub_layout_dir(path: Path, name: str | None = None) -> nn.Module:
    """A directory with ``config.json`` + weights, as ``timm.models.push_to_hf_hub`` writes it (``name``: the
    spec it came from, for a Hub snapshot)."""
    where = name or path
    if not path.is_dir():
        raise PosthocError(f"model directory {path} does not exist; check the path")
    if not (path / "config.json").exists():
        raise PosthocError(
            f"{where} has no config.json; a model directory needs timm's Hub layout "
            "(config.json + model.safetensors), or pass a weights file with --arch"
        )
    weights = next((path / f for f in HUB_WEIGHT_FILES if (path / f).is_file()), None)
    if weights is None:
        raise PosthocError(
            f"{where} has no weights file ({' or '.join(HUB_WEIGHT_FILES[:2])}); copy the weights next to config.json"
        )
    source = str(path / "config.json") if name is None else f"{name}'s config.json"
    config = check_timm_config(read_json_file(path / "config.json", "model config"), source)
    state_dict = read_state_dict(weights)
    model = build_from_timm_config(config, source=source, elements=sum(t.numel() for t in state_dict.values()))
    load_weights(model, state_dict, source=str(weights))
    model.checkpoint_dtype = floating_dtype(state_dict)
    return model


def _load_weights_file(path: Path, arch: str | None, warn: Callable[[str], None] | None = None) -> nn.Module:
    if not path.is_file():
        raise PosthocError(f"weights file {path} does not exist; check the path")
    if not arch:
        raise PosthocError(f"{path.name} is a bare weights file; also pass --arch NAME (the timm architecture)")
    if not timm.is_model(arch):
        raise PosthocError(f"unknown architecture '{arch}'{suggest_architecture(arch)}")
    state_dict = read_state_dict(path)
    model = timm.create_model(arch, pretrained=False)
    classes = checkpoint_num_classes(model, state_dict)
    beside = _timm_config_beside(path, arch)
    kwargs = {"num_classes": classes} if classes is not None and classes != model.num_classes else {}
    if beside is not None:  # the checkpoint's own preprocessing (timm's Hub layout next to the file)
        kwargs["pretrained_cfg_overlay"] = beside
    if kwargs:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    load_weights(model, state_dict, source=str(path))
    model.checkpoint_dtype = floating_dtype(state_dict)
    if beside is None:
        cfg = model.pretrained_cfg
        size = cfg.get("test_input_size") or cfg.get("input_size")
        message = (
            f"{path.name} records no preprocessing, so {arch}'s defaults are assumed: input {size[-1]}x{size[-2]}, "
            f"crop_pct {cfg.get('test_crop_pct') or cfg.get('crop_pct')}, {cfg.get('interpolation')}, mean {tuple(cfg.get('mean', ()))}; "
            "if it was trained otherwise pass --img-size/--crop-pct/--mean/--std, or put its config.json beside it"
        )
        (warn or (lambda m: warnings.warn(m, stacklevel=3)))(message)
    return model


def _timm_config_beside(path: Path, arch: str) -> dict | None:
    """The preprocessing fields of the ``pretrained_cfg`` of a timm ``config.json`` next to a weights file,
    when it is for ``arch`` (checked as any config; only fields :data:`PRETRAINED_CFG` knows are used)."""
    file = path.parent / "config.json"
    try:
        config = json.loads(file.read_text(encoding="utf-8")) if file.is_file() and file.stat().st_size < 1 << 24 else None
    except (ValueError, OSError):
        return None
    if isinstance(config, dict) and config.get("architecture") == arch and isinstance(config.get("pretrained_cfg"), dict):
        config = check_timm_config(config, str(file))
        return {k: v for k, v in config["pretrained_cfg"].items() if k in PRETRAINED_FIELDS.optional}
    return None
