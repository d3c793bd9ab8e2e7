"""The ensemble artifact on disk: ``model.safetensors`` + ``config.json`` + ``README.md``.

Layout of ``model.safetensors`` (one file, no pickles):

- ``groups.<g>.shared.<name>``: a tensor every member of group ``g`` shares, stored once;
- ``groups.<g>.members.<name>``: a tensor that differs, stacked with a leading member dimension;
- ``coupling.weight`` / ``coupling.bias``: the learned combine layer, when the rule is ``coupling``.

``config.json`` records the format version, each group's timm config (architecture, ``model_args``,
``pretrained_cfg``), the members, the combine rule, the :class:`~posthoc.ensemble.Provenance` (method,
every hyper-parameter, what it measured, the data it tuned on, build-time metrics, command), the
versions of posthoc / torch / timm, the size and SHA-256 of ``model.safetensors``, and an ``integrity``
record: the SHA-256 of ``config.json`` itself (less that record, as canonical JSON: sorted keys, no
spaces). Both are checked on load, so a modified or truncated artifact fails with one clear line;
artifacts written before the record existed are still read, their weights checked as before
(:func:`seal` records it for an artifact whose ``config.json`` was edited on purpose). ``README.md`` is a
Hub model card rendered from ``model_cards/``.

Reading checks every field ``config.json`` has against :data:`ARTIFACT_CONFIG` (types, ranges, the timm
configs of the groups, as :func:`posthoc.timm_io.check_timm_config`), refuses ``NaN`` and infinity in
it and in the weights, and names the first field or tensor that is wrong in one line.

This is the only module that knows the format: "is this an artifact?" (:func:`is_artifact_config`,
:func:`is_artifact_dir`), reading and writing one. Publishing is :mod:`posthoc.commands.push`; ``posthoc
info``'s rows are rendered beside the model card (:func:`posthoc.card.summarize`).

Writing is atomic: everything goes to a temporary sibling directory that is renamed into place at the
end, so an interrupted run never leaves a half-written artifact.
"""

from __future__ import annotations

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
from .ensemble import COMBINE_RULES, Combine, Ensemble, MemberGroup, Provenance
from .errors import PosthocError, first_line
from .fused import EnsembleModule
from .paths import ensure_writable, os_errors, parse_json, public_mode, read_json_file, remove_stale_siblings, temporary_sibling
from .schema import Anything, Flag, Integer, ListOf, MapOf, Maybe, Number, OneOf, Record, Text, Where
from .schema import check as check_fields
from .timm_io import MAX_CLASSES, PRETRAINED_CFG, TIMM_CONFIG, check_finite
from .views import VIEWS

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
CARD = "README.md"
FILES = (CONFIG, WEIGHTS, CARD)
INTEGRITY = "integrity"
DIGEST = r"[0-9a-f]{12}"  # a tuned-on image: the first 12 hex digits of the SHA-256 of its file's bytes

_NAME = Text(max_len=1000)
_COST = Record(
    required={"flops_ratio": Number(ge=0)},
    optional={"time_ratio": Maybe(Number(ge=0)), "budget": Maybe(Number(ge=0)), "members": Integer(ge=1), "views": Integer(ge=1)},
)
ARTIFACT_CONFIG = Record(
    required={
        "posthoc": Record(
            required={"format_version": Integer(ge=1)},
            optional={"posthoc_version": Maybe(_NAME), "torch_version": Maybe(_NAME), "timm_version": Maybe(_NAME)},
        ),
        "method": Record(
            required={"name": Text(max_len=100)},
            optional={
                "config": MapOf(Anything()),
                "measured": Record(
                    optional={
                        "inference_cost": Maybe(_COST),
                        "teacher_flops_ratio": Number(ge=0),
                        "cost_parent_epochs": Number(ge=0),
                        "teacher_members": Integer(ge=1),
                    }
                ),
                "include_parent": Flag(),
            },
        ),
        "combine": Record(
            required={"rule": OneOf(*COMBINE_RULES)},
            optional={"temperature": Number(ge=1e-6, le=1e6), "views": Maybe(ListOf(OneOf(*VIEWS), min_len=1))},
        ),
        "num_classes": Integer(ge=1, le=MAX_CLASSES),
        "num_members": Integer(ge=1),
        "members": ListOf(Record(required={"name": _NAME, "group": Integer(ge=0)}), min_len=1),
        "groups": ListOf(
            Record(
                required={
                    "timm_config": Where(TIMM_CONFIG, lambda c: None if "num_classes" in c else "a timm config with num_classes"),
                    "members": ListOf(_NAME, min_len=1),
                    "shared_tensors": ListOf(_NAME),
                    "member_tensors": ListOf(_NAME),
                    "shared_numel": Integer(ge=0),
                    "member_numel": Integer(ge=0),
                }
            ),
            min_len=1,
        ),
    },
    optional={
        "pretrained_cfg": PRETRAINED_CFG,
        "sources": Maybe(ListOf(_NAME)),
        "data": Maybe(
            Record(
                optional={
                    "dataset": Maybe(_NAME),
                    "train_split": Maybe(_NAME),
                    "tuned_on": Maybe(_NAME),
                    "select_size": Maybe(Integer(ge=1)),
                    "data_config": MapOf(Anything()),
                    "tuned_images": Record(
                        required={"count": Integer(ge=0), "digests": Text(f"({DIGEST}( {DIGEST})*)?", "hex digests")},
                        optional={"hash": Text(max_len=200)},
                    ),
                }
            )
        ),
        "metrics": Maybe(MapOf(MapOf(Maybe(Number())))),
        "command": Maybe(Text()),
        "files": Record(
            optional={WEIGHTS: Record(optional={"bytes": Integer(ge=0), "sha256": Text(r"[0-9a-f]{64}", "a SHA-256 in hex")})}
        ),
        INTEGRITY: Record(required={"config_sha256": Text(r"[0-9a-f]{64}", "a SHA-256 in hex")}),
    },
)
"""Every field of an artifact's ``config.json`` that posthoc reads, with its type and range."""


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
            config = seal(_config(ensemble, provenance or Provenance(), tmp / WEIGHTS))
            (tmp / CONFIG).write_text(json.dumps(config, indent=2, allow_nan=False) + "\n")
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
    check_finite(tensors, str(weights))
    return _ensemble(config, tensors, path), config


def read_config(path: str | Path) -> dict[str, Any]:
    """The artifact's ``config.json``: a posthoc artifact of a format this posthoc reads, matching its
    integrity record (when it has one), every field checked against :data:`ARTIFACT_CONFIG`."""
    path = Path(path)
    file = path / CONFIG
    if not path.exists():
        raise PosthocError(f"artifact {path} does not exist; check the path")
    if not path.is_dir():
        raise PosthocError(f"{path} is a file, not an artifact directory (config.json + model.safetensors)")
    if not file.exists():
        raise PosthocError(f"{path} is not a posthoc artifact (no {CONFIG})")
    config = read_json_file(file, "artifact config", "the artifact is incomplete, rebuild or re-download it")
    if not is_artifact_config(config):
        raise PosthocError(f"{path} is not a posthoc artifact ({CONFIG} has no 'posthoc' section)")
    version = config["posthoc"].get("format_version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise PosthocError(f"{file}: field posthoc.format_version must be a whole number, got {json.dumps(version)}")
    if version > FORMAT_VERSION:
        raise PosthocError(
            f"{path} uses artifact format {version}, newer than this posthoc reads ({FORMAT_VERSION}); upgrade posthoc"
        )
    record = config.get(INTEGRITY)
    if isinstance(record, dict) and record.get("config_sha256") != config_digest(config):
        raise PosthocError(
            f"{file} does not match the SHA-256 of its integrity record: it was edited or damaged; rebuild or "
            "re-download the artifact (or, for an edit of your own, posthoc.artifact.seal it)"
        )
    check_fields(config, ARTIFACT_CONFIG, str(file))
    _check_consistent(config, file)
    return config


def config_digest(config: dict[str, Any]) -> str:
    """The SHA-256 of ``config`` without its integrity record, as canonical JSON (sorted keys, no spaces)."""
    body = {k: v for k, v in config.items() if k != INTEGRITY}
    try:
        text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except ValueError:  # NaN or infinity: never a match
        return ""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def seal(config: dict[str, Any] | str | Path) -> dict[str, Any]:
    """``config`` with its integrity record set to what it holds now. Given an artifact directory, rewrites its
    ``config.json`` that way (after an edit of your own: a moved source, a corrected name) and returns it."""
    if isinstance(config, dict):
        return {**{k: v for k, v in config.items() if k != INTEGRITY}, INTEGRITY: {"config_sha256": config_digest(config)}}
    path = Path(config)
    text = (path / CONFIG).read_text(encoding="utf-8")
    sealed = seal(parse_json(text, str(path / CONFIG)))
    tmp = temporary_sibling(path / CONFIG)
    try:
        with os_errors(f"writing {path / CONFIG}"):
            tmp.write_text(json.dumps(sealed, indent=2, allow_nan=False) + "\n")
            public_mode(tmp)
            os.replace(tmp, path / CONFIG)
    finally:
        tmp.unlink(missing_ok=True)
    return sealed


def _check_consistent(config: dict[str, Any], file: Path) -> None:
    """Fields that must agree with each other: member counts, group indices, class counts."""
    groups, members = config["groups"], config["members"]
    listed = sum(len(g["members"]) for g in groups)
    if not config["num_members"] == len(members) == listed:
        raise PosthocError(
            f"{file}: num_members ({config['num_members']}), members ({len(members)}) and the groups' members ({listed}) "
            "disagree; fix or regenerate it"
        )
    if any(m["group"] >= len(groups) for m in members):
        raise PosthocError(f"{file}: a member names a group that does not exist; fix or regenerate it")
    classes = {g["timm_config"]["num_classes"] for g in groups}
    if classes != {config["num_classes"]}:
        raise PosthocError(
            f"{file}: num_classes ({config['num_classes']}) disagrees with its groups' ({', '.join(map(str, sorted(classes)))}); "
            "fix or regenerate it"
        )


def is_artifact_config(config: Any) -> bool:
    """True for the ``config.json`` of a posthoc artifact (timm configs have no ``posthoc`` section)."""
    return isinstance(config, dict) and isinstance(config.get("posthoc"), dict)


def is_artifact_dir(path: str | Path) -> bool:
    """True when the directory ``path`` holds a posthoc artifact's ``config.json`` (one that says so; whether
    it is readable is :func:`read_config`'s to tell)."""
    file = Path(path) / CONFIG
    try:
        if not file.is_file() or file.stat().st_size > 256 << 20:
            return False
        return is_artifact_config(json.loads(file.read_text(encoding="utf-8")))
    except (ValueError, OSError, RecursionError):
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
        module = EnsembleModule(ensemble.as_float32(), strategy=strategy, fold_bn=fold_bn).eval()
    except RuntimeError as e:  # state dict keys or shapes that this timm does not build
        raise PosthocError(
            f"{path}: its tensors do not fit the architecture this timm builds ({first_line(e)[:160]}); "
            f"the artifact is damaged or needs timm {config['posthoc'].get('timm_version')}"
        ) from e
    module.posthoc_config = config
    module.posthoc_name = name or str(path)
    return module


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
            views=tuple(combine_cfg.get("views") or ("identity",)),  # artifacts before views: the image alone
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
