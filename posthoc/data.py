"""ImageFolder data: splits, deterministic parts and subsets, timm transforms, loaders.

Data lives in ``DIR/<split>/<class>/<image>``. A split can be cut into two deterministic parts, the
way ``../shared/BENCH.md`` cuts CIFAR-10's ``val/``: sort the file paths (relative to the split),
shuffle them with ``random.Random(0)``, the first ``select_size`` are **select** (anything a method
tunes or selects on) and the rest are **report** (what results are reported on). Write a part as
``SPLIT:PART``, e.g. ``val:select`` or ``val:report``; the same rule is used everywhere, so a method
that selected on ``val:select`` can never see ``val:report``.

Preprocessing comes from the model (timm's ``pretrained_cfg``) through ``timm.data``'s
``resolve_data_config`` and ``create_transform``; explicit overrides win.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset, SubsetRandomSampler
from torchvision import datasets
from torchvision import transforms as T

from .errors import PosthocError
from .runtime import seeded_generator

PARTS = ("select", "report")
DEFAULT_SELECT_FRACTION = 0.4  # 2,000 of CIFAR-10's 5,000 val images, as BENCH.md fixes


@dataclass(frozen=True)
class SplitSpec:
    """``SPLIT[:PART]``: a split directory and optionally its select or report part."""

    split: str
    part: str | None = None

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        split, _, part = text.partition(":")
        if not split:
            raise PosthocError(f"split '{text}' is empty; write e.g. 'val' or 'val:report'")
        if part and part not in PARTS:
            raise PosthocError(f"unknown split part '{part}' in '{text}'; use {' or '.join(PARTS)}")
        return cls(split, part or None)

    def __str__(self) -> str:
        return f"{self.split}:{self.part}" if self.part else self.split


# ------------------------------------------------------------------------------------ preprocessing
def resolve_data_config(model: nn.Module, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """The model's eval preprocessing (input size, interpolation, crop_pct, mean, std) with overrides.

    Follows timm's ``validate.py``: ``timm.data.resolve_data_config(args, model=model,
    use_test_size=True)``; ``overrides`` uses the same keys as timm's arguments (``img_size``,
    ``input_size``, ``crop_pct``, ``interpolation``, ``mean``, ``std``, ``crop_mode``).
    """
    from timm.data import resolve_data_config as timm_resolve

    args = {k: v for k, v in (overrides or {}).items() if v is not None}
    return timm_resolve(args, model=model, use_test_size=True)


def eval_transform(data_config: dict[str, Any]):
    """timm's eval transform (resize by crop_pct, center crop, normalize) for ``data_config``."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def train_transform(data_config: dict[str, Any], augment: str = "light"):
    """Training transform used by methods that fine-tune.

    ``light`` (default): the eval geometry, then a random crop of the input size with reflect-padding of
    1/8 of the side and a horizontal flip. It keeps the statistics a converged model was trained on close
    to its eval inputs, which fine-tuning for one epoch needs. ``timm``: timm's own training transform
    (RandomResizedCrop etc.), for models trained with it. ``none``: the eval transform.
    """
    if augment == "none":
        return eval_transform(data_config)
    if augment == "timm":
        from timm.data import create_transform

        cfg = {k: v for k, v in data_config.items() if k in ("input_size", "interpolation", "mean", "std")}
        return create_transform(**cfg, is_training=True)
    if augment != "light":
        raise PosthocError(f"unknown augmentation '{augment}'; use light, timm or none")
    base = eval_transform(data_config)
    size = data_config["input_size"][-2:]
    pad = max(1, size[-1] // 8)
    steps = list(base.transforms)
    to_tensor = next(i for i, t in enumerate(steps) if isinstance(t, (T.ToTensor, T.PILToTensor, T.Normalize)))
    aug = [T.RandomCrop(tuple(size), padding=pad, padding_mode="reflect"), T.RandomHorizontalFlip()]
    return T.Compose(steps[:to_tensor] + aug + steps[to_tensor:])


# --------------------------------------------------------------------------------------- datasets
def image_folder(
    root: str | Path,
    split: str | SplitSpec,
    transform=None,
    *,
    label_names: Sequence[str] | None = None,
    select_size: int | None = None,
    subset: int | None = None,
) -> Dataset:
    """The images of ``root/split`` (optionally one part of it, optionally a deterministic subset).

    Args:
        root: dataset directory holding one folder per split.
        split: ``"val"``, ``"val:select"``, ``"val:report"`` or a :class:`SplitSpec`.
        transform: applied to each PIL image.
        label_names: the model's class names; when the folder's classes are the same set in another
            order, targets follow the model's order.
        select_size: images in the select part (default 40% of the split).
        subset: keep only this many images, a fixed random sample (seed 0) in file order.
    """
    spec = split if isinstance(split, SplitSpec) else SplitSpec.parse(split)
    root = Path(root)
    if not root.is_dir():
        raise PosthocError(f"data directory {root} does not exist; pass --data DIR with DIR/<split>/<class>/*")
    folder = root / spec.split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise PosthocError(
            f"split '{spec.split}' not found in {root} (it has: {', '.join(found) or 'no folders'}); "
            "expected DIR/<split>/<class>/<image>"
        )
    try:
        dataset = datasets.ImageFolder(str(folder), transform=transform)
    except (FileNotFoundError, RuntimeError) as e:
        raise PosthocError(f"no images in {folder}: expected {folder}/<class>/<image> (jpg, png, ...)") from e
    _align_labels(dataset, label_names)
    indices = part_indices(dataset, spec.part, select_size)
    if subset is not None:
        if subset <= 0:
            raise PosthocError(f"--subset must be positive, got {subset}")
        if subset < len(indices):
            keep = sorted(random.Random(0).sample(range(len(indices)), subset))
            indices = [indices[i] for i in keep]
    if len(indices) == len(dataset):
        return dataset
    view = Subset(dataset, indices)
    view.classes, view.targets = dataset.classes, [dataset.targets[i] for i in indices]
    return view


def part_indices(dataset: datasets.ImageFolder, part: str | None, select_size: int | None = None) -> list[int]:
    """Indices of the select or report part (BENCH.md rule); all indices for ``part=None``."""
    n = len(dataset)
    if part is None:
        return list(range(n))
    root = Path(dataset.root)
    rel = [Path(p).relative_to(root).as_posix() for p, _ in dataset.samples]
    order = sorted(range(n), key=rel.__getitem__)
    random.Random(0).shuffle(order)
    k = default_select_size(n) if select_size is None else select_size
    if not 0 < k < n:
        raise PosthocError(f"select size {k} must be between 1 and {n - 1} for a split of {n} images")
    chosen = order[:k] if part == "select" else order[k:]
    return sorted(chosen)


def default_select_size(n: int) -> int:
    """Images in the select part of a split of ``n`` images: 40% (2,000 of 5,000)."""
    return max(1, round(DEFAULT_SELECT_FRACTION * n))


def _align_labels(dataset: datasets.ImageFolder, label_names: Sequence[str] | None) -> None:
    if not label_names or sorted(label_names) != sorted(dataset.classes) or list(label_names) == dataset.classes:
        return
    remap = {dataset.class_to_idx[name]: i for i, name in enumerate(label_names)}
    dataset.samples = [(p, remap[t]) for p, t in dataset.samples]
    dataset.imgs = dataset.samples
    dataset.targets = [remap[t] for t in dataset.targets]
    dataset.classes = list(label_names)
    dataset.class_to_idx = {c: i for i, c in enumerate(label_names)}


# ---------------------------------------------------------------------------------------- loaders
def default_workers() -> int:
    """DataLoader workers: one per spare core, at most 8 (the main process runs the model)."""
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool = False,
    workers: int | None = None,
    seed: int = 0,
    drop_last: bool = False,
    pin_memory: bool | None = None,
    sample: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader with workers and pinned memory (when CUDA is present) by default.

    Shuffling uses a generator seeded with ``seed``, so the same seed gives the same batch order.
    ``sample`` (indices, repeats allowed: a bootstrap sample) replaces the dataset by those images, in
    a seeded random order.
    """
    workers = default_workers() if workers is None else workers
    generator = seeded_generator(seed)
    sampler = None
    if sample is not None:
        sampler, shuffle = SubsetRandomSampler(list(sample), generator=generator), False
    drop_last = drop_last and (len(dataset) if sample is None else len(sample)) > batch_size  # never drop the only batch
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        sampler=sampler,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=False,
        drop_last=drop_last,
        generator=generator,
    )
