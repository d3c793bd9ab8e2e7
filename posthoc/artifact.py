"""The ensemble artifact on disk: ``model.safetensors`` + ``config.json`` + ``README.md``.

Layout of ``model.safetensors`` (one file, no pickles):

- ``groups.<g>.shared.<name>``: a tensor every member of group ``g`` shares, stored once;
- ``groups.<g>.members.<name>``: a tensor that differs, stacked with a leading member dimension;
- ``coupling.weight`` / ``coupling.bias``: the learned combine layer, when the rule is ``coupling``.

``config.json`` records the format version, each group's timm config (architecture, ``model_args``,
``pretrained_cfg``), the members, the combine rule, the method and every hyper-parameter it used, the
metrics measured at build time, the data it tuned on, the versions of posthoc / torch / timm, and the
size and SHA-256 of ``model.safetensors`` (checked on load, so a modified or truncated artifact fails
with one clear line). ``README.md`` is a Hub model card rendered from ``model_cards/``.

Writing is atomic: everything goes to a temporary sibling directory that is renamed into place at the
end, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .ensemble import Combine, Ensemble, MemberGroup
from .errors import PosthocError

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"


def save(ensemble: Ensemble, out: str | Path, *, overwrite: bool = False) -> Path:
    """Write ``ensemble`` to the directory ``out`` atomically and return its path."""
    out = Path(out)
    check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        tensors = _tensors(ensemble)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: a deterministic header
        config = _config(ensemble, tmp / WEIGHTS)
        (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        from .card import render_card

        (tmp / CARD).write_text(render_card(config))
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def check_output(out: Path, overwrite: bool) -> None:
    """Refuse an existing ``out`` unless ``overwrite``, and never overwrite what is not an artifact."""
    if not out.exists():
        return
    if not overwrite:
        raise PosthocError(f"output {out} already exists; pass --overwrite or choose another --out")
    from .sources import is_artifact

    if not out.is_dir() or (any(out.iterdir()) and not is_artifact(str(out))):
        raise PosthocError(f"--overwrite replaces artifacts only, and {out} is not one; choose another --out")


def read(path: str | Path) -> tuple[Ensemble, dict[str, Any]]:
    """Read an artifact directory into an :class:`Ensemble` and its ``config.json`` dict."""
    path = Path(path)
    config = read_config(path)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise PosthocError(f"{path} has no {WEIGHTS}; the artifact is incomplete, rebuild or re-download it")
    expected = config.get("files", {}).get(WEIGHTS, {})
    size = weights.stat().st_size
    if expected.get("bytes") is not None and size != expected["bytes"]:
        raise PosthocError(
            f"{weights} has {size} bytes but config.json records {expected['bytes']}: the file is truncated or "
            "was replaced; rebuild or re-download the artifact"
        )
    if expected.get("sha256") and _sha256(weights) != expected["sha256"]:
        raise PosthocError(
            f"{weights} does not match the SHA-256 in config.json: it was modified or damaged; rebuild or "
            "re-download the artifact"
        )
    try:
        tensors = load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as e:
        raise PosthocError(f"cannot read {weights}: {str(e).splitlines()[0]}; the file is corrupt") from e
    return _ensemble(config, tensors, path), config


def read_config(path: str | Path) -> dict[str, Any]:
    """The artifact's ``config.json``, checked to be a posthoc artifact of a readable format version."""
    path = Path(path)
    file = path / CONFIG
    if not file.is_file():
        raise PosthocError(f"{path} is not a posthoc artifact (no {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PosthocError(f"{file} is not valid JSON ({e}); the artifact is damaged, rebuild it") from e
    meta = config.get("posthoc") if isinstance(config, dict) else None
    if not isinstance(meta, dict):
        raise PosthocError(f"{path} is not a posthoc artifact ({CONFIG} has no 'posthoc' section)")
    version = meta.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PosthocError(
            f"{path} uses artifact format {version}, newer than this posthoc reads ({FORMAT_VERSION}); upgrade posthoc"
        )
    return config


def load(path: str | Path, strategy: str = "auto", fold_bn: bool = True):
    """Load an artifact as one ``torch.nn.Module`` (see :class:`posthoc.fused.EnsembleModule`).

    ``path`` is an artifact directory or ``hf-hub:org/name`` for one pushed with ``posthoc push``.
    ``strategy`` and ``fold_bn`` (BatchNorm folded into convolutions) are :class:`EnsembleModule`'s.

    ``forward(x)`` returns the ensemble's class probabilities (B, C); ``forward(x,
    return_members=True)`` also returns per-member probabilities (K, B, C). The module is in eval
    mode and carries ``pretrained_cfg`` (preprocessing) and ``posthoc_config`` (the config.json).
    """
    from .fused import EnsembleModule

    name = str(path)
    path = resolve(path)
    ensemble, config = read(path)
    try:
        module = EnsembleModule(ensemble, strategy=strategy, fold_bn=fold_bn).eval()
    except RuntimeError as e:  # state dict keys or shapes that this timm does not build
        raise PosthocError(
            f"{path}: its tensors do not fit the architecture this timm builds ({str(e).splitlines()[0][:160]}); "
            f"the artifact is damaged or needs timm {config['posthoc'].get('timm_version')}"
        ) from e
    module.posthoc_config = config
    module.posthoc_name = name
    return module


def resolve(path: str | Path) -> Path:
    """The local directory of an artifact: ``PATH``, ``local-dir:PATH``, or ``hf-hub:org/name[@rev]``
    (downloaded through the Hugging Face cache, see :mod:`posthoc.hub`)."""
    spec = str(path)
    if spec.startswith(("hf-hub:", "hf_hub:")):
        from .hub import download_artifact

        return download_artifact(spec)
    return Path(spec.removeprefix("local-dir:"))


# ------------------------------------------------------------------------------------- internals
def _tensors(ensemble: Ensemble) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for g, group in enumerate(ensemble.groups):
        for name, t in group.shared.items():
            out[f"groups.{g}.shared.{name}"] = t.detach().cpu().contiguous()
        for name, t in group.stacked.items():
            out[f"groups.{g}.members.{name}"] = t.detach().cpu().contiguous()
    if ensemble.combine.coupling_weight is not None:
        out["coupling.weight"] = ensemble.combine.coupling_weight.detach().cpu().contiguous()
        out["coupling.bias"] = ensemble.combine.coupling_bias.detach().cpu().contiguous()
    return out


def _config(ensemble: Ensemble, weights: Path) -> dict[str, Any]:
    import timm

    from . import __version__

    groups, members = [], []
    for g, group in enumerate(ensemble.groups):
        shared_n, member_n = group.stored_numel()
        groups.append(
            {
                "timm_config": group.timm_config,
                "members": group.member_names,
                "shared_tensors": sorted(group.shared),
                "member_tensors": sorted(group.stacked),
                "shared_numel": shared_n,
                "member_numel": member_n,
            }
        )
        members += [{"name": n, "group": g} for n in group.member_names]
    return {
        "posthoc": {
            "format_version": FORMAT_VERSION,
            "posthoc_version": __version__,
            "torch_version": torch.__version__,
            "timm_version": timm.__version__,
        },
        "method": {"name": ensemble.method, "config": ensemble.method_config},
        "combine": ensemble.combine.to_config(),
        "num_classes": ensemble.num_classes,
        "num_members": ensemble.num_members,
        "members": members,
        "groups": groups,
        "pretrained_cfg": ensemble.pretrained_cfg,
        "sources": ensemble.sources,
        "data": ensemble.data,
        "metrics": ensemble.metrics,
        "command": ensemble.command,
        "files": {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": _sha256(weights)}},
    }


def _ensemble(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> Ensemble:
    try:
        groups = []
        if not isinstance(config["groups"], list) or not isinstance(config["method"], dict):
            raise PosthocError(f"{path}: config.json is malformed; the artifact is damaged")
        for g, spec in enumerate(config["groups"]):
            shared = {n: tensors.pop(f"groups.{g}.shared.{n}") for n in spec["shared_tensors"]}
            stacked = {n: tensors.pop(f"groups.{g}.members.{n}") for n in spec["member_tensors"]}
            k = len(spec["members"])
            bad = [n for n, t in stacked.items() if t.shape[0] != k]
            if bad:
                raise PosthocError(f"{path}: member tensor {bad[0]} does not have {k} members; the artifact is damaged")
            groups.append(MemberGroup(spec["timm_config"], list(spec["members"]), shared, stacked))
        combine_cfg = dict(config["combine"])
        combine = Combine(
            rule=combine_cfg["rule"],
            temperature=float(combine_cfg.get("temperature", 1.0)),
            include_parent=bool(combine_cfg.get("include_parent", False)),
            coupling_weight=tensors.pop("coupling.weight", None),
            coupling_bias=tensors.pop("coupling.bias", None),
        )
        method = config["method"]["name"]
    except (KeyError, TypeError) as e:
        raise PosthocError(f"{path}: config.json and {WEIGHTS} disagree (missing {e}); the artifact is damaged") from e
    if tensors:
        raise PosthocError(f"{path}: {WEIGHTS} holds tensors config.json does not list ({next(iter(tensors))}); the artifact is damaged")
    return Ensemble(
        groups=groups,
        combine=combine,
        method=method,
        method_config=config["method"].get("config", {}),
        metrics=config.get("metrics", {}),
        sources=config.get("sources", []),
        data=config.get("data", {}),
        command=config.get("command"),
    )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_mb(path: str | Path) -> float:
    """Size of an artifact directory on disk, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
