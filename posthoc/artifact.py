"""The ensemble artifact on disk: ``model.safetensors`` + ``config.json`` + ``README.md``.

Layout of ``model.safetensors`` (one file, no pickles):

- ``groups.<g>.shared.<name>``: a tensor every member of group ``g`` shares, stored once;
- ``groups.<g>.members.<name>``: a tensor that differs, stacked with a leading member dimension;
- ``coupling.weight`` / ``coupling.bias``: the learned combine layer, when the rule is ``coupling``.

``config.json`` records the format version, each group's timm config (architecture, ``model_args``,
``pretrained_cfg``), the members, the combine rule, the :class:`~posthoc.ensemble.Provenance` (method,
every hyper-parameter, what it measured, the data it tuned on, build-time metrics, command), the
versions of posthoc / torch / timm, and the size and SHA-256 of ``model.safetensors`` (checked on load,
so a modified or truncated artifact fails with one clear line). ``README.md`` is a Hub model card
rendered from ``model_cards/``.

This is the only module that knows the format: "is this an artifact?" (:func:`is_artifact_config`,
:func:`is_artifact_dir`), reading, writing, summarising and publishing one.

Writing is atomic: everything goes to a temporary sibling directory that is renamed into place at the
end, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .card import render_card
from .ensemble import Combine, Ensemble, MemberGroup, Provenance
from .errors import PosthocError, first_line
from .fused import EnsembleModule
from .paths import ensure_writable, os_errors, public_mode, remove_stale_siblings, temporary_sibling

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FILES = (CONFIG, WEIGHTS, CARD)


def save(
    ensemble: Ensemble,
    out: str | Path,
    provenance: Provenance | None = None,
    *,
    overwrite: bool = False,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write ``ensemble`` and how it was made (``provenance``) to the directory ``out`` atomically; return ``out``.

    ``dtype`` stores the floating tensors in that dtype (default: as they are). Temporary directories of
    earlier writes to ``out`` whose process is gone are removed first.
    """
    out = Path(out)
    check_output(out, overwrite)
    remove_stale_siblings(out)
    with os_errors(f"writing the artifact {out}"):
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_sibling(out)
        tmp.mkdir()
    try:
        with os_errors(f"writing the artifact {out}"):
            tensors = _tensors(ensemble, dtype)
            save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})  # one key: a deterministic header
            config = _config(ensemble, provenance or Provenance(), tmp / WEIGHTS)
            (tmp / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
            (tmp / CARD).write_text(render_card(config))
            for name in FILES:
                public_mode(tmp / name)
            if out.exists():
                old = temporary_sibling(out, "old")
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
    """Before any work: ``out`` must be writable, absent or (with ``overwrite``) an artifact holding nothing
    but posthoc's own files, so that replacing it never deletes anything a user put there."""
    out = Path(out)
    ensure_writable(out, "artifact directory")
    if not out.exists():
        return
    if not overwrite:
        raise PosthocError(f"output {out} already exists; pass --overwrite or choose another --out")
    if not out.is_dir() or (any(out.iterdir()) and not is_artifact_dir(out)):
        raise PosthocError(f"--overwrite replaces artifacts only, and {out} is not one; choose another --out")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    if foreign:
        raise PosthocError(
            f"{out} also holds files posthoc did not write ({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
            "move them out or choose another --out, since --overwrite replaces the whole directory"
        )


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
        raise PosthocError(f"cannot read {weights}: {first_line(e)}; the file is corrupt") from e
    return _ensemble(config, tensors, path), config


def read_config(path: str | Path) -> dict[str, Any]:
    """The artifact's ``config.json``, checked to be a posthoc artifact of a readable format version."""
    path = Path(path)
    file = path / CONFIG
    if not path.exists():
        raise PosthocError(f"artifact {path} does not exist; check the path")
    if not file.is_file():
        raise PosthocError(f"{path} is not a posthoc artifact (no {CONFIG})")
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PosthocError(f"{file} is not valid JSON ({e}); the artifact is damaged, rebuild it") from e
    if not is_artifact_config(config):
        raise PosthocError(f"{path} is not a posthoc artifact ({CONFIG} has no 'posthoc' section)")
    version = config["posthoc"].get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise PosthocError(
            f"{path} uses artifact format {version}, newer than this posthoc reads ({FORMAT_VERSION}); upgrade posthoc"
        )
    return config


def is_artifact_config(config: Any) -> bool:
    """True for the ``config.json`` of a posthoc artifact (timm configs have no ``posthoc`` section)."""
    return isinstance(config, dict) and isinstance(config.get("posthoc"), dict)


def is_artifact_dir(path: str | Path) -> bool:
    """True when the directory ``path`` holds a posthoc artifact's ``config.json``."""
    file = Path(path) / CONFIG
    if not file.is_file():
        return False
    try:
        return is_artifact_config(json.loads(file.read_text()))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


def load(path: str | Path, strategy: str = "auto", fold_bn: bool = True, name: str | None = None):
    """Load the artifact in the local directory ``path`` as one module (:class:`posthoc.fused.EnsembleModule`).

    ``strategy`` and ``fold_bn`` (BatchNorm folded into convolutions) are :class:`EnsembleModule`'s;
    ``name`` is what results call the model (default: the path). ``posthoc.load`` also takes
    ``hf-hub:org/name`` (see :func:`posthoc.sources.load_artifact`).
    """
    path = Path(path)
    ensemble, config = read(path)
    try:
        module = EnsembleModule(_as_float32(ensemble), strategy=strategy, fold_bn=fold_bn).eval()
    except RuntimeError as e:  # state dict keys or shapes that this timm does not build
        raise PosthocError(
            f"{path}: its tensors do not fit the architecture this timm builds ({first_line(e)[:160]}); "
            f"the artifact is damaged or needs timm {config['posthoc'].get('timm_version')}"
        ) from e
    module.posthoc_config = config
    module.posthoc_name = name or str(path)
    return module


def _as_float32(ensemble: Ensemble) -> Ensemble:
    """Weights stored in half precision, as float32 for inference (as timm loads half checkpoints into a
    float32 model; ``torch.autocast`` or ``module.half()`` give lower precision where it is wanted)."""

    def wide(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.float() if v.is_floating_point() and v.dtype != torch.float64 else v for k, v in tensors.items()}

    groups = [dataclasses.replace(g, shared=wide(g.shared), member_tensors=wide(g.member_tensors)) for g in ensemble.groups]
    combine = ensemble.combine
    if combine.coupling_weight is not None:
        combine = dataclasses.replace(
            combine, coupling_weight=combine.coupling_weight.float(), coupling_bias=combine.coupling_bias.float()
        )
    return Ensemble(groups, combine)


def push(
    path: str | Path,
    repo: str,
    *,
    private: bool | None = None,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
    endpoint: str | None = None,
) -> str:
    """Upload the artifact in ``path`` to a Hub model repository (created when absent) in one commit; return its URL.

    The weights are checked against the SHA-256 in ``config.json`` first, so a damaged artifact is never
    published. The model card is rendered again with ``hf-hub:REPO`` in its usage lines.
    """
    from .hub import commit, hub_spec, split_repo

    path = Path(path)
    repo_id, rev = split_repo(repo)
    if rev is not None:
        raise PosthocError(f"give the branch with --revision, not in the repository id '{repo}'")
    _, config = read(path)  # validates config.json and the weights' size and SHA-256
    card = render_card(config, load_path=hub_spec(repo_id, None if create_pr else revision))
    files = {CONFIG: str(path / CONFIG), WEIGHTS: str(path / WEIGHTS), CARD: card.encode()}
    message = commit_message or f"Upload {config['method']['name']} ensemble ({config['num_members']} members) with posthoc"
    return commit(
        repo_id, files, message=message, private=private, revision=revision, create_pr=create_pr, token=token, endpoint=endpoint
    )


def summarize(config: dict[str, Any], path: str | Path | None = None) -> list[tuple[str, str]]:
    """``(label, text)`` rows describing an artifact: members, combine rule, what is shared, sizes,
    versions, hyper-parameters and stored metrics (what ``posthoc info`` prints)."""
    method, combine = config["method"], config["combine"]
    provenance = Provenance.from_config(config)
    rows = [
        ("method", method["name"]),
        ("members", f"{config['num_members']}: " + ", ".join(m["name"] for m in config["members"])),
    ]
    rule = combine["rule"] + (f" (temperature {combine['temperature']:.3g})" if combine.get("temperature", 1) != 1 else "")
    rows.append(("combine", rule + (", parent included" if provenance.include_parent else "")))
    rows.append(("classes", str(config["num_classes"])))
    for g, group in enumerate(config["groups"]):
        member_names = group["member_tensors"]
        total = group["shared_numel"] + group["member_numel"] // max(len(group["members"]), 1)
        share = 100.0 * group["shared_numel"] / max(total, 1)
        rows.append(
            (
                f"group {g}",
                f"{group['timm_config']['architecture']} x{len(group['members'])}: {len(group['shared_tensors'])} tensors shared "
                f"({group['shared_numel'] / 1e6:.2f}M elements, {share:.0f}% of a member), {len(member_names)} member-specific "
                f"({group['member_numel'] / 1e6:.2f}M elements in all)",
            )
        )
        if member_names:
            rows.append(("", "member-specific: " + _module_summary(member_names)))
    stored = sum(g["shared_numel"] + g["member_numel"] for g in config["groups"])
    rows.append(("stored elements", f"{stored / 1e6:.2f}M"))
    cost = provenance.measured.get("inference_cost")
    if cost:
        text = f"{cost['flops_ratio']:.2f}x the parent's forward FLOPs"
        if cost.get("time_ratio") is not None:
            text += f", {cost['time_ratio']:.2f}x its forward time where it was built"
        if cost.get("budget") is not None:
            text += f" (budget {cost['budget']:g}x)"
        rows.append(("inference cost", text))
    if path is not None:
        rows.append(("size on disk", f"{size_mb(path):.1f} MB"))
    meta = config["posthoc"]
    rows.append(("built with", f"posthoc {meta['posthoc_version']}, torch {meta['torch_version']}, timm {meta['timm_version']}"))
    if provenance.method == "distill":
        teacher = provenance.measured
        rows.append(
            (
                "distilled from",
                f"{teacher.get('teacher')} ({teacher.get('teacher_members')} members, "
                f"{teacher.get('teacher_flops_ratio', 0):.2f}x FLOPs), about "
                f"{teacher.get('cost_parent_epochs', 0):.2f} parent-epochs",
            )
        )
    if provenance.config:
        rows.append(("hyper-parameters", ", ".join(f"{k}={v}" for k, v in provenance.config.items())))
    parent = provenance.metrics.get(f"parent on {provenance.data.get('tuned_on')}")
    own = provenance.metrics.get(str(provenance.data.get("tuned_on")))
    if isinstance(parent, dict) and isinstance(own, dict) and "nll" in parent and "nll" in own:
        rows.append(
            (
                "gain on the select part",
                f"top-1 {own['top1'] - parent['top1']:+.2f}, NLL {own['nll'] - parent['nll']:+.4f} vs the parent",
            )
        )
    for split, metrics in provenance.metrics.items():
        if isinstance(metrics, dict):
            rows.append(
                (f"metrics ({split})", ", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, (int, float))))
            )
    return rows


def _module_summary(names: list[str], limit: int = 6) -> str:
    """Tensor names grouped by their module prefix, e.g. 'layer4.* (30), fc.* (2)'."""
    groups: dict[str, int] = {}
    for n in names:
        parts = n.split(".")
        key = ".".join(parts[:2]) if len(parts) > 2 else parts[0]
        groups[key] = groups.get(key, 0) + 1
    items = [f"{k}.* ({v})" for k, v in groups.items()]
    return ", ".join(items[:limit]) + (f", ... ({len(items) - limit} more)" if len(items) > limit else "")


# ------------------------------------------------------------------------------------- internals
def _tensors(ensemble: Ensemble, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    def stored(t: torch.Tensor) -> torch.Tensor:
        t = t.detach().cpu()
        return (t.to(dtype) if dtype is not None and t.is_floating_point() else t).contiguous()

    out: dict[str, torch.Tensor] = {}
    for g, group in enumerate(ensemble.groups):
        for name, t in group.shared.items():
            out[f"groups.{g}.shared.{name}"] = stored(t)
        for name, t in group.member_tensors.items():
            out[f"groups.{g}.members.{name}"] = stored(t)
    if ensemble.combine.coupling_weight is not None:
        out["coupling.weight"] = ensemble.combine.coupling_weight.detach().cpu().contiguous()
        out["coupling.bias"] = ensemble.combine.coupling_bias.detach().cpu().contiguous()
    return out


def _config(ensemble: Ensemble, provenance: Provenance, weights: Path) -> dict[str, Any]:
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
                "member_tensors": sorted(group.member_tensors),
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
        "method": {
            "name": provenance.method,
            "config": provenance.config,
            "measured": provenance.measured,
            "include_parent": provenance.include_parent,
        },
        "combine": ensemble.combine.to_config(),
        "num_classes": ensemble.num_classes,
        "num_members": ensemble.num_members,
        "members": members,
        "groups": groups,
        "pretrained_cfg": ensemble.pretrained_cfg,
        "sources": provenance.sources,
        "data": provenance.data,
        "metrics": provenance.metrics,
        "command": provenance.command,
        "files": {WEIGHTS: {"bytes": weights.stat().st_size, "sha256": _sha256(weights)}},
    }


def _ensemble(config: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> Ensemble:
    try:
        groups = []
        if not isinstance(config["groups"], list) or not isinstance(config["method"], dict):
            raise PosthocError(f"{path}: config.json is malformed; the artifact is damaged")
        for g, spec in enumerate(config["groups"]):
            shared = {n: tensors.pop(f"groups.{g}.shared.{n}") for n in spec["shared_tensors"]}
            member = {n: tensors.pop(f"groups.{g}.members.{n}") for n in spec["member_tensors"]}
            k = len(spec["members"])
            bad = [n for n, t in member.items() if t.shape[0] != k]
            if bad:
                raise PosthocError(f"{path}: member tensor {bad[0]} does not have {k} members; the artifact is damaged")
            groups.append(MemberGroup(spec["timm_config"], list(spec["members"]), shared, member))
        combine_cfg = dict(config["combine"])
        combine = Combine(
            rule=combine_cfg["rule"],
            temperature=float(combine_cfg.get("temperature", 1.0)),
            coupling_weight=tensors.pop("coupling.weight", None),
            coupling_bias=tensors.pop("coupling.bias", None),
        )
    except (KeyError, TypeError) as e:
        raise PosthocError(f"{path}: config.json and {WEIGHTS} disagree (missing {e}); the artifact is damaged") from e
    if tensors:
        raise PosthocError(
            f"{path}: {WEIGHTS} holds tensors config.json does not list ({next(iter(tensors))}); the artifact is damaged"
        )
    return Ensemble(groups=groups, combine=combine)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def size_mb(path: str | Path) -> float:
    """Size of an artifact directory on disk, in MB (10^6 bytes)."""
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 1e6
