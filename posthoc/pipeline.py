"""The one preparation every command makes before its own work.

:func:`prepare` does, in this order: check the outputs (:func:`check_outputs`, before any compute, so an
hour of work is never lost to a bad ``--out``, and never one input lost to an output), pick the device, load the models, resolve the preprocessing (the model's own,
timm's ``resolve_data_config``, with overrides), cut the select part (inheriting the select size an
artifact recorded, :func:`inherited_select_size`), open the splits and check the label space
(:func:`posthoc.labels.check_label_space`: models against each other and against the data). It returns a
:class:`Run` that makes the loaders every command and method uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from . import data as data_mod
from .artifact import check_output
from .errors import PosthocError, first_line
from .labels import check_data_classes, check_label_space
from .options import DataOptions, LoaderOptions, PreprocessingOptions
from .paths import ensure_writable
from .runtime import resolve_device

SELECT, TRAIN = "select", "train"  # the parts a training command opens; any other name is a split spec


@dataclass(frozen=True)
class Output:
    """A place a command writes: an artifact directory (replaced whole, only with ``--overwrite``) or a file
    (``replace``: an existing one is rewritten without ``--overwrite``, as results files are, when ``ours``
    says posthoc wrote it; a file posthoc did not write is never replaced without ``--overwrite``)."""

    path: Path
    what: str = "artifact directory"
    replace: bool = False
    ours: Callable[[Path], bool] | None = None

    @property
    def is_artifact(self) -> bool:
        return self.what == "artifact directory"


def check_outputs(outputs: Sequence[Output], overwrite: bool = False, inputs: Sequence[str | Path | None] = ()) -> None:
    """Before any work, the one rule of every place a command writes: it is writable; it never is, holds or
    lies in an input (the models, the data, label and statistics files: ``inputs``) or another output,
    compared after resolving links; an existing artifact directory is replaced only with ``overwrite`` and
    only when it holds nothing else; an existing file only with ``overwrite`` (or ``replace``, when posthoc
    wrote it). Nothing is created here: an output's directory is made by its final atomic write."""
    named = [
        Path(str(p).removeprefix("local-dir:")).expanduser()
        for p in inputs
        if isinstance(p, (str, Path)) and not str(p).startswith(("hf-hub:", "hf_hub:", "hfds/"))
    ]
    taken = [(p, "input") for p in named if _exists(p)]
    for out in outputs:
        for other, role in taken:
            relation = _relation(out.path, other)
            if relation:
                raise PosthocError(f"the {out.what} {out.path} {relation} the {role} {other}; write it elsewhere")
        taken.append((out.path, out.what))
        if out.is_artifact:
            check_output(out.path, overwrite)
            continue
        ensure_writable(out.path, out.what)
        if out.path.is_dir():
            raise PosthocError(f"the {out.what} {out.path} is a directory; name the file to write")
        if _exists(out.path) and not out.path.is_file():
            raise PosthocError(f"the {out.what} {out.path} exists and is not a regular file; name a file to write")
        if out.path.exists() and not overwrite:
            if not out.replace:
                raise PosthocError(f"output {out.path} already exists; pass --overwrite or choose another place")
            if out.ours is not None and not out.ours(out.path):
                raise PosthocError(
                    f"the {out.what} {out.path} already exists and is not one posthoc wrote; choose another name "
                    "(or remove the file)"
                )


def _exists(path: Path) -> bool:
    """True for anything at ``path``, a dangling link included (a name the system cannot look up: nothing)."""
    try:
        return path.exists() or path.is_symlink()
    except OSError:
        return False


def _relation(a: Path, b: Path) -> str | None:
    """How the place ``a`` overlaps ``b`` (after resolving links): ``is``, ``lies inside``, ``contains``, or None."""
    try:
        a, b = a.expanduser().resolve(), b.expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a link loop
        raise PosthocError(f"cannot resolve {a} or {b} ({first_line(e)}); check the links on the path") from None
    if a == b:
        return "is"
    return "lies inside" if a.is_relative_to(b) else ("contains" if b.is_relative_to(a) else None)


def recorded_data(model: nn.Module) -> dict[str, Any]:
    """What an artifact recorded of the data it was tuned on (``{}`` for a checkpoint)."""
    return dict((getattr(model, "posthoc_config", None) or {}).get("data") or {})


def inherited_select_size(
    record: dict[str, Any], part: data_mod.SplitSpec, select_size: int | None
) -> tuple[int | None, str | None]:
    """The select size to cut ``part`` with, and a warning when ``part`` overlaps what an artifact was tuned on.

    The one rule: an artifact records the split part and select size it tuned on; a command reading the
    same split uses that select size unless ``--select-size`` is given, so ``val:report`` holds none of
    the tuned images. ``record`` is :func:`recorded_data` of the artifact.
    """
    tuned = record.get("tuned_on")
    if not tuned:
        return select_size, None
    t_split, _, t_part = tuned.partition(":")
    if t_split != part.split:
        return select_size, None
    recorded = record.get("select_size")
    if select_size is None:
        select_size = recorded
    where = f"this artifact was tuned on '{tuned}' ({recorded} images)"
    if part.part is None or not t_part:
        return select_size, f"{where}, which is part of '{part}'; figures on it are optimistic. Report on '{t_split}:report'."
    if part.part == t_part:
        return select_size, f"{where}; figures on the same images are optimistic. Report on '{t_split}:report'."
    if part.part == "report" and recorded is not None and select_size < recorded:
        return select_size, (
            f"{where}; with --select-size {select_size} '{part}' includes {recorded - select_size} of them, "
            f"so figures are optimistic. Drop --select-size to use the recorded {recorded}."
        )
    return select_size, None


@dataclass
class Run:
    """What :func:`prepare` built: the device, the loaded models, the preprocessing and the opened splits."""

    device: torch.device
    specs: list[str]
    models: list[nn.Module]
    data: DataOptions
    data_config: dict[str, Any]
    label_names: list[str] | None
    select: data_mod.SplitSpec
    select_size: int | None
    sets: dict[str, Dataset]
    workers: int | None = None
    sources: dict[str, data_mod.Source] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        return self.models[0]

    def _open(self, part: str | data_mod.SplitSpec, transform, subset: int | None = None) -> Dataset:
        spec = part if isinstance(part, data_mod.SplitSpec) else data_mod.SplitSpec.parse(part)
        if spec.split not in self.sources:
            given = self.data.data
            self.sources[spec.split] = given if isinstance(given, data_mod.Source) else data_mod.open_source(given, spec.split)
        return data_mod.open_split(
            self.sources[spec.split],
            spec,
            transform,
            label_names=self.label_names,
            class_map=self.data.class_map,
            select_size=self.select_size,
            subset=subset or self.data.subset,
            skip_bad=self.data.skip_bad_images,
        )

    def train_set(self, augment: str = "light", subset: int | None = None) -> Dataset:
        """The training split with ``augment`` (:func:`posthoc.data.train_transform`)."""
        return self._open(self.data.train_split, data_mod.train_transform(self.data_config, augment), subset)

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
        """Training images in a seeded order (see :meth:`posthoc.methods.base.BoostContext.train_loader`)."""
        return data_mod.make_loader(
            self.train_set(augment, subset),
            batch_size,
            shuffle=shuffle,
            seed=seed,
            workers=self.workers,
            drop_last=shuffle,
            sample=sample,
            shard=shard,
        )

    def select_loader(self, batch_size: int = 256, *, subset: int | None = None, shard: str | None = None):
        """The select part of the validation split, in a fixed order, eval transform."""
        dataset = (
            self.sets[SELECT] if subset is None else self._open(self.select, data_mod.eval_transform(self.data_config), subset)
        )
        return data_mod.make_loader(dataset, batch_size, workers=self.workers, shard=shard)

    def tuned_sets(self) -> list[Dataset]:
        """The images an artifact built from this run was tuned on: the select part, and the training split
        too where it is the split the select part comes from (``--train-split val``)."""
        sets = [self.sets[SELECT]] if SELECT in self.sets else []
        if TRAIN in self.sets and data_mod.SplitSpec.parse(self.data.train_split).split == self.select.split:
            sets.append(self.sets[TRAIN])
        return sets

    def data_record(self, earlier: dict[str, Any] | None = None, *, preprocessing: bool = True) -> dict[str, Any]:
        """What the artifact records of its data (:func:`posthoc.data.data_record`): the select part with its
        size, the preprocessing, and the content digests of :meth:`tuned_sets` (with ``earlier``'s)."""
        return data_mod.data_record(
            self.data.data if not isinstance(self.data.data, data_mod.Source) else self.data.data.root,
            self.data.train_split if TRAIN in self.sets else None,
            self.select,
            len(self.sets[SELECT]),
            self.data_config if preprocessing else None,
            tuned=self.tuned_sets(),
            earlier=earlier,
        )

    def loader(self, name: str, batch_size: int = 256, *, shard: str | None = None):
        """A loader over the opened set ``name`` (a part given to :func:`prepare`), in a fixed order."""
        return data_mod.make_loader(self.sets[name], batch_size, workers=self.workers, shard=shard)


def prepare(
    specs: Sequence[str],
    data: DataOptions,
    *,
    load: Callable[[str], nn.Module],
    parts: Sequence[str] = (SELECT,),
    outputs: Sequence[Output] = (),
    overwrite: bool = False,
    inputs: Sequence[str | Path | None] = (),
    loader: LoaderOptions | None = None,
    preprocessing: PreprocessingOptions | None = None,
    data_config_from: int = 0,
    label_names: bool = True,
    data_classes: Callable[[int], int] | None = None,
    sources: dict[str, data_mod.Source] | None = None,
    log: Callable[[str], None] = lambda message: None,
    warn: Callable[[str], None] = lambda message: None,
) -> Run:
    """Everything a command needs before its own work, checked in one place (see the module docstring).

    Args:
        specs: the model specs, loaded in order with ``load`` (which refuses what the command cannot take).
        data: the data options; ``parts`` names what to open: ``"train"`` (the training split, checked and
            counted; loaders re-open it with their augmentation), ``"select"`` (the select part of the
            validation split) or a split spec such as ``"val:report"`` (``eval``).
        outputs: places the command writes, checked before any model is loaded: none may be, hold or lie in
            an input (the models, the data, the class map, and ``inputs``: other files the command reads).
        data_config_from: the model whose preprocessing the data gets (the others are fed the same images).
        label_names: align the data's classes to the model's label names (off for ``--valid-labels``).
        data_classes: maps the model's class count to the class count the data must have (``--valid-labels``
            lists a subset); default: the same.
        sources: indexed splits to reuse (several models, one scan) and fill.
    """
    loader = loader or LoaderOptions()
    check_outputs(outputs, overwrite, inputs=[*specs, data.data, data.class_map, *inputs])
    device = resolve_device(loader.device)
    models = [load(spec).to(device) for spec in specs]
    check_label_space(specs, models)
    base = models[data_config_from]
    data_config = data_mod.resolve_data_config(base, preprocessing.overrides() if preprocessing else None)
    val = data_mod.SplitSpec.parse(data.val_split)
    record = next((r for r in map(recorded_data, models) if r.get("tuned_on")), {})
    select = data_mod.SplitSpec(val.split, SELECT)
    select_size, _ = inherited_select_size(record, select, data.select_size)
    run = Run(
        device=device,
        specs=list(specs),
        models=models,
        data=data,
        data_config=data_config,
        label_names=next((m.pretrained_cfg.get("label_names") for m in models if m.pretrained_cfg.get("label_names")), None)
        if label_names
        else None,
        select=select,
        select_size=select_size,
        sets={},
        workers=loader.workers,
        sources=sources if sources is not None else {},
    )
    eval_tf = data_mod.eval_transform(data_config)
    for part in parts:
        if part == TRAIN:
            run.sets[TRAIN] = run._open(data.train_split, None)
        elif part == SELECT:
            run.sets[SELECT] = run._open(select, eval_tf)
        else:
            spec = data_mod.SplitSpec.parse(part)
            run.select_size, warning = inherited_select_size(record, spec, data.select_size)
            if warning and not data_mod.recorded_digests(record):  # digests tell by content, after the run
                warn(warning)
            run.sets[part] = run._open(spec, eval_tf)
    expected = data_classes(base.num_classes) if data_classes else None
    for dataset in run.sets.values():
        classes = len(dataset.classes)
        if expected is None:
            check_data_classes(base.num_classes, classes, class_map=data.class_map)
        else:
            check_data_classes(expected, classes, "--valid-labels lists")
    if TRAIN in run.sets:
        log(f"{len(run.sets[TRAIN])} training images, {len(run.sets.get(SELECT, []))} select images of {select}")
    return run
