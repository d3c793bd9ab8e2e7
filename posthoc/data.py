"""Data: splits of a folder, a tar or a Hugging Face dataset, deterministic parts, timm transforms, loaders.

``--data`` is one of

- a directory ``DIR/<split>/<class>/<image>`` (an ImageFolder per split, read as torchvision does);
- a ``.tar`` of one split with one folder per class at its top level (read by timm's tar reader; the
  split name is then ignored, only a part applies);
- ``hfds/NAME``: a Hugging Face dataset (``pip install datasets``), split names as the Hub has them;
- an in-memory dataset of ``{"image": PIL image, "label": int}`` records (:func:`from_records`).

A split can be cut into two deterministic parts, the way ``benchmarks/PROTOCOL.md`` cuts CIFAR-10's
``val/``: sort the samples by key (the file path relative to the split for folders, the member name
for tars, the zero-padded index for datasets without paths), shuffle them with ``random.Random(0)``,
the first ``select_size`` are **select** (anything a method tunes or selects on) and the rest are
**report**. Write a part as ``SPLIT:PART``, e.g. ``val:select``; the same rule is used everywhere, so
a method that selected on ``val:select`` never sees ``val:report``.

Targets follow the model's class order: when the model has label names, the data's class names must
be the same set (any order); otherwise ``--class-map FILE`` (one class name per line, in the model's
class order, as timm's) says which is which. An unreadable image stops with its name, or is skipped
and counted with ``--skip-bad-images``.

Preprocessing comes from the model (timm's ``pretrained_cfg``) through ``timm.data``'s
``resolve_data_config`` and ``create_transform``; explicit overrides win.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing
import os
import random
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import (
    BatchSampler,
    DataLoader,
    Dataset,
    RandomSampler,
    SequentialSampler,
    Subset,
    SubsetRandomSampler,
    default_collate,
)
from torchvision import datasets
from torchvision import transforms as T

from . import distributed
from .errors import PosthocError, first_line, printable
from .paths import read_text_file
from .runtime import seeded_generator

PARTS = ("select", "report")
DEFAULT_SELECT_FRACTION = 0.4  # 2,000 of CIFAR-10's 5,000 val images, as benchmarks/PROTOCOL.md fixes
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming", "random")


@dataclass(frozen=True)
class SplitSpec:
    """``SPLIT[:PART]``: a split and optionally its select or report part."""

    split: str
    part: str | None = None

    @classmethod
    def parse(cls, text: str) -> SplitSpec:
        """``SPLIT[:PART]``, the split a name (a folder of the data directory, never a path to elsewhere)."""
        split, _, part = str(text).partition(":")
        if not split:
            raise PosthocError(f"split '{text}' is empty; write e.g. 'val' or 'val:report'")
        if any(c in split for c in "/\\") or split in (".", "..") or split.startswith(".") or not split.isprintable():
            raise PosthocError(f"split '{split}' is not a split name: name a folder of the data directory (e.g. val), not a path")
        if part and part not in PARTS:
            raise PosthocError(f"unknown split part '{part}' in '{text}'; use {' or '.join(PARTS)}")
        return cls(split, part or None)

    def __str__(self) -> str:
        return f"{self.split}:{self.part}" if self.part else self.split


# ------------------------------------------------------------------------------------ checks
def check_loader_options(
    batch_size: int | None = None, workers: int | None = None, subset: int | None = None, select_size: int | None = None
) -> None:
    """One line for a batch size, worker count, subset or select size that cannot work (before any work)."""
    for name, value, least in (
        ("--batch-size", batch_size, 1),
        ("--workers", workers, 0),
        ("--subset", subset, 1),
        ("--select-size", select_size, 1),
    ):
        if value is not None and value < least:
            raise PosthocError(f"{name} must be at least {least}, got {value}")


def check_preprocessing(overrides: dict[str, Any] | None) -> None:
    """One line for a preprocessing override that cannot work: sizes, crop fraction, interpolation, mean, std."""
    o = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "img_size" in o and o["img_size"] < 1:
        raise PosthocError(f"--img-size must be a positive number of pixels, got {o['img_size']}")
    if "crop_pct" in o and not 0 < o["crop_pct"] <= 1:
        raise PosthocError(
            f"--crop-pct is the fraction of the resized image kept by the center crop, in (0, 1]; got {o['crop_pct']}"
        )
    if "interpolation" in o and o["interpolation"] not in INTERPOLATIONS:
        raise PosthocError(f"--interpolation must be one of {', '.join(INTERPOLATIONS)}, got '{o['interpolation']}'")
    for name in ("mean", "std"):
        if name in o and len(o[name]) not in (1, 3):
            raise PosthocError(f"--{name} needs one value per color channel (3, e.g. 0.5,0.5,0.5), got {len(o[name])}")
    if "std" in o and any(v <= 0 for v in o["std"]):
        raise PosthocError(f"--std values must be positive, got {','.join(map(str, o['std']))}")


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


def data_record(
    data: str | Path,
    train_split: str | None,
    select_spec: Any,
    select_size: int,
    data_config: dict[str, Any] | None = None,
    tuned: Sequence[Dataset] = (),
    earlier: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What an artifact records of the data it was built on: dataset, training split, the select part it was
    tuned on (with its size, so ``eval`` inherits it and ``val:report`` holds none of those images), the
    preprocessing, and the content digests of every image in ``tuned`` (the select part, and the training
    set where it is a split ``eval`` may score) with those of an ``earlier`` record (:func:`tuned_record`)."""
    record: dict[str, Any] = {"dataset": str(data)}
    if train_split is not None:
        record["train_split"] = train_split
    record.update(tuned_on=str(select_spec), select_size=select_size)
    if data_config is not None:
        record["data_config"] = {k: list(v) if isinstance(v, tuple) else v for k, v in data_config.items()}
    digests = set(recorded_digests(earlier or {}))
    for dataset in tuned:
        digests |= set(content_digests(dataset))
    if digests:
        record["tuned_images"] = tuned_record(digests)
    return record


def tuned_record(digests: set[str]) -> dict[str, Any]:
    """The compact record of tuned-on images: their sorted digests in one string."""
    return {"hash": DIGEST_TEXT, "count": len(digests), "digests": " ".join(sorted(digests))}


def recorded_digests(record: dict[str, Any]) -> frozenset[str]:
    """The digests of the images an artifact's data ``record`` says it was tuned on (empty for older ones)."""
    tuned = record.get("tuned_images") or {}
    text = tuned.get("digests") if isinstance(tuned, dict) else None
    return frozenset(text.split()) if isinstance(text, str) else frozenset()


def eval_transform(data_config: dict[str, Any]):
    """timm's eval transform (resize by crop_pct, center crop, normalize) for ``data_config``."""
    from timm.data import create_transform

    return create_transform(**data_config, is_training=False)


def train_transform(data_config: dict[str, Any], augment: str = "light"):
    """Training transform used by methods that fine-tune.

    ``light`` (default): the eval geometry, then a random crop of the input size with reflect-padding of
    1/8 of the side and a horizontal flip. It keeps the statistics a converged model was trained on close
    to its eval inputs, which fine-tuning for one epoch needs. ``timm``: timm's own training transform
    (RandomResizedCrop etc.), for models trained with it. ``none``: the eval transform. A strength may
    follow a colon: ``light:F`` pads by the fraction F of the side, ``timm:S`` crops at least the fraction
    S of the image's area (timm's default 0.08) (per-child augmentation draws).
    """
    augment, _, strength = str(augment).partition(":")
    try:
        value = float(strength) if strength else None
    except ValueError:
        value = -1.0
    if value is not None and not (0 < value <= 1):
        raise PosthocError(f"augmentation strength must be a number in (0, 1], got '{strength}'")
    if augment == "none" and value is None:
        return eval_transform(data_config)
    if augment == "timm":
        from timm.data import create_transform

        cfg = {k: v for k, v in data_config.items() if k in ("input_size", "interpolation", "mean", "std")}
        return create_transform(**cfg, is_training=True, **({} if value is None else {"scale": (value, 1.0)}))
    if augment != "light":
        raise PosthocError(f"unknown augmentation '{augment}'; use light, timm or none")
    base = eval_transform(data_config)
    size = data_config["input_size"][-2:]
    pad = max(1, size[-1] // 8) if value is None else max(1, round(size[-1] * value))
    steps = list(base.transforms)
    to_tensor = next(i for i, t in enumerate(steps) if isinstance(t, (T.ToTensor, T.PILToTensor, T.Normalize)))
    aug = [T.RandomCrop(tuple(size), padding=pad, padding_mode="reflect"), T.RandomHorizontalFlip()]
    return T.Compose(steps[:to_tensor] + aug + steps[to_tensor:])


# --------------------------------------------------------------------------------------- sources
DIGEST_CHARS = 12
DIGEST_TEXT = f"sha256 of the image file's bytes, first {DIGEST_CHARS} hex digits"
IMAGE_EXTENSIONS = tuple(datasets.folder.IMG_EXTENSIONS)


def image_digest(data: bytes) -> str:
    """An image's content digest: the first 12 hex digits of the SHA-256 of its bytes."""
    return hashlib.sha256(data).hexdigest()[:DIGEST_CHARS]


def is_hidden(name: str) -> bool:
    """Hidden entries (``.ipynb_checkpoints``, ``.DS_Store``, macOS ``._x.jpg`` forks) are never classes or images."""
    return name.startswith(".")


def decode_image(data: bytes) -> Any:
    """The RGB PIL image in ``data``: a declared size beyond PIL's decompression-bomb limit is an unreadable
    image (``ValueError``), and 16-bit or 32-bit grey images are scaled to 8 bits, not clipped."""
    from PIL import Image

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ValueError(f"{first_line(e).split(',')[0]}: a decompression bomb, not decoded") from None
    return to_rgb(image)


def to_rgb(image: Any) -> Any:
    """``image`` as 8-bit RGB: high-depth grey modes (``I;16``, ``I``, ``F``) scaled from their range to 0-255,
    everything else converted by PIL."""
    import numpy as np
    from PIL import Image

    if image.mode == "RGB":
        return image
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        values = np.asarray(image, dtype=np.float64)
        if image.mode == "F":
            top = 1.0 if values.size and np.nanmax(values) <= 1.0 else 255.0
        elif image.mode.startswith("I;16") or (values.size and values.max() <= 65535):
            top = 65535.0
        else:
            top = float(2**32 - 1)
        scaled = np.nan_to_num(values / top * 255.0, nan=0.0).clip(0, 255).round().astype(np.uint8)
        return Image.fromarray(scaled, mode="L").convert("RGB")
    return image.convert("RGB")


@dataclass
class Source:
    """Where the images of one split come from: sample ``keys`` (sorted for the parts), class ``targets``
    and ``classes``, how to ``load`` sample ``i`` (a PIL image) and ``describe`` it in an error, and (where
    images are files) how to ``read`` its bytes, which ``load`` decodes and :func:`image_digest` hashes."""

    keys: list[str]
    targets: list[int]
    classes: list[str]
    load: Callable[[int], Any]
    describe: Callable[[int], str]
    root: str
    read: Callable[[int], bytes] | None = None

    def digest(self, i: int) -> str:
        """The content digest of sample ``i`` (of its file's bytes; of its pixels where there is no file)."""
        if self.read is not None:
            return image_digest(self.read(i))
        image = self.load(i)
        return image_digest(f"{image.mode} {image.size}".encode() + image.tobytes())


def scan_folder(folder: Path) -> tuple[list[str], list[tuple[str, int]]]:
    """The classes (sorted non-hidden subfolders) and ``(path, class index)`` samples of a split folder, in
    torchvision ``ImageFolder``'s order: image files by extension, hidden entries skipped, a linked
    directory followed once (never into a loop)."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise PosthocError(f"cannot list {folder} ({e.strerror or first_line(e)})") from None
    classes = [e.name for e in entries if not is_hidden(e.name) and e.is_dir()]
    samples: list[tuple[str, int]] = []
    empty = []
    for index, name in enumerate(classes):
        seen: set[str] = set()
        walked = []
        for root, dirs, files in os.walk(folder / name, followlinks=True):
            seen.add(os.path.realpath(root))
            dirs[:] = [d for d in dirs if not is_hidden(d) and os.path.realpath(os.path.join(root, d)) not in seen]
            seen.update(os.path.realpath(os.path.join(root, d)) for d in dirs)  # each reached once, by one path
            walked.append((root, files))
        found = 0
        for root, files in sorted(walked):  # torchvision's order
            for file in sorted(files):
                if not is_hidden(file) and file.lower().endswith(IMAGE_EXTENSIONS):
                    samples.append((os.path.join(root, file), index))
                    found += 1
        if not found:
            empty.append(name)
    if not classes:
        raise PosthocError(f"no images in {folder}: expected {folder}/<class>/<image> (jpg, png, ...), found no class folders")
    if empty:
        raise PosthocError(
            f"no images in class folder(s) {', '.join(printable(n) for n in empty[:3])} of {folder} (jpg, png, ...); "
            "add images or remove the folder"
        )
    return classes, samples


def folder_source(folder: Path) -> Source:
    """A class-folder split, scanned by :func:`scan_folder` (classes sorted by name, as ``ImageFolder``)."""
    classes, samples = scan_folder(folder)
    paths = [p for p, _ in samples]

    def read(i: int) -> bytes:
        with open(paths[i], "rb") as f:
            return f.read()

    return Source(
        keys=[Path(p).relative_to(folder).as_posix() for p in paths],
        targets=[t for _, t in samples],
        classes=classes,
        load=lambda i: decode_image(read(i)),
        describe=lambda i: paths[i],
        root=str(folder),
        read=read,
    )


def tar_source(archive: Path) -> Source:
    """A ``.tar`` of one split, class folders at its top level (timm's ``ReaderImageInTar``)."""
    from timm.data.readers.reader_image_in_tar import ReaderImageInTar

    try:
        reader = ReaderImageInTar(str(archive))
    except Exception as e:  # tarfile, empty archive, no class folders
        raise PosthocError(
            f"cannot read {archive} as a tar of class folders ({first_line(e)}); expect <class>/<image> at its top level"
        ) from e
    if len(reader) == 0:
        raise PosthocError(f"{archive} holds no images; expect <class>/<image> at its top level")
    names = [reader.filename(i) for i in range(len(reader))]
    keep = [i for i, n in enumerate(names) if not any(is_hidden(part) for part in n.split("/"))]  # as for folders
    labels = [reader.class_idx_to_name[int(t)] for t in reader.targets]
    kept = {labels[i] for i in keep}
    classes = [reader.class_idx_to_name[i] for i in range(len(reader.class_idx_to_name)) if reader.class_idx_to_name[i] in kept]
    if not keep:
        raise PosthocError(f"{archive} holds no images outside hidden folders; expect <class>/<image> at its top level")
    index = {c: k for k, c in enumerate(classes)}

    def read(j: int) -> bytes:
        return reader[keep[j]][0].read()

    return Source(
        keys=[names[i] for i in keep],
        targets=[index[labels[i]] for i in keep],
        classes=classes,
        load=lambda j: decode_image(read(j)),
        describe=lambda j: f"{archive}:{names[keep[j]]}",
        root=str(archive),
        read=read,
    )


def records_source(
    records: Sequence[dict], classes: Sequence[str], name: str = "dataset", image_key: str = "image", label_key: str = "label"
) -> Source:
    """A sequence of ``{image_key: PIL image or bytes, label_key: int}`` records (a Hugging Face dataset, or a
    list); keys are the zero-padded indices, so the parts follow index order."""

    def load(i: int):
        image = records[i][image_key]
        if isinstance(image, (bytes, bytearray)):
            return decode_image(bytes(image))
        if isinstance(image, dict) and "bytes" in image:
            return decode_image(image["bytes"])
        return to_rgb(image)

    n = len(records)
    return Source(
        keys=[f"{i:012d}" for i in range(n)],
        targets=[int(records[i][label_key]) for i in range(n)],
        classes=list(classes),
        load=load,
        describe=lambda i: f"{name}[{i}]",
        root=name,
    )


def hfds_source(name: str, split: str) -> Source:
    """``hfds/NAME``: a Hugging Face dataset split, through the ``datasets`` library (optional)."""
    try:
        import datasets as hf_datasets
    except ImportError as e:
        raise PosthocError("hfds/ data needs the datasets library: pip install 'posthoc[hfds]'") from e
    try:
        ds = hf_datasets.load_dataset(name, split=split)
    except Exception as e:  # unknown name, split, no network
        raise PosthocError(f"cannot load Hugging Face dataset '{name}' split '{split}': {first_line(e)}") from e
    image_key = next((k for k in ("image", "img", "pixel_values") if k in ds.column_names), None)
    label_key = next((k for k in ("label", "labels", "fine_label") if k in ds.column_names), None)
    if image_key is None or label_key is None:
        raise PosthocError(f"Hugging Face dataset '{name}' has no image and label columns (it has {', '.join(ds.column_names)})")
    feature = ds.features[label_key]
    classes = list(getattr(feature, "names", None) or [str(i) for i in range(max(ds[label_key]) + 1)])
    return records_source(ds, classes, name=f"hfds/{name}", image_key=image_key, label_key=label_key)


def open_source(data: str | Path, split: str) -> Source:
    """The :class:`Source` of ``split`` in ``data`` (a directory, a .tar, or hfds/NAME)."""
    text = str(data)
    if text.startswith("hfds/"):
        return hfds_source(text[len("hfds/") :], split)
    root = Path(text)
    SplitSpec.parse(split)  # a name, never a path
    if root.is_file() and root.suffix.lower() == ".tar":
        return tar_source(root)
    if root.exists() and not root.is_dir():
        name = root.name.lower()
        if name.endswith((".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".tar.zst", ".zip")):
            raise PosthocError(
                f"--data {root} is a compressed archive, which posthoc does not read; extract it (or make a plain .tar "
                "of one split's class folders) and pass that"
            )
        kind = "file" if root.is_file() else "FIFO, socket or device"
        raise PosthocError(
            f"--data {root} is a {kind}, not a data directory or a .tar; pass DIR with DIR/<split>/<class>/*, a .tar, or hfds/NAME"
        )
    if not root.is_dir():
        raise PosthocError(
            f"data directory {root} does not exist; pass --data DIR with DIR/<split>/<class>/*, a .tar, or hfds/NAME"
        )
    folder = root / split
    if not folder.is_dir():
        found = sorted(p.name for p in root.iterdir() if p.is_dir() and not is_hidden(p.name))
        raise PosthocError(
            f"split '{split}' not found in {root} (it has: {', '.join(found) or 'no folders'}); expected DIR/<split>/<class>/<image>"
        )
    return folder_source(folder)


# --------------------------------------------------------------------------------------- datasets
_SKIPPED: Any = None  # shared with DataLoader workers (created before they fork)


def skipped_images() -> int:
    """Unreadable images skipped so far in this process and its loader workers (``--skip-bad-images``)."""
    return 0 if _SKIPPED is None else int(_SKIPPED.value)


class ImageSet(Dataset):
    """The images of one split with targets in the model's class order; unreadable images are named, or
    skipped (``None``, dropped by the loader) when ``skip_bad``."""

    with_digests = False  # also return each image's digest as an int64 (eval sets it to recognise tuned images)

    def __init__(self, source: Source, transform=None, skip_bad: bool = False):
        global _SKIPPED
        self.source, self.transform, self.skip_bad = source, transform, skip_bad
        self.keys, self.targets, self.classes = source.keys, list(source.targets), list(source.classes)
        self.root = source.root
        if skip_bad and _SKIPPED is None:
            _SKIPPED = multiprocessing.Value("i", 0)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """``(description, target)`` per sample (the file path for folders), as torchvision's ImageFolder."""
        return [(self.source.describe(i), t) for i, t in enumerate(self.targets)]

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        digest = None
        try:
            if self.with_digests and self.source.read is not None:
                data = self.source.read(i)
                digest, image = image_digest(data), decode_image(data)
            else:
                image = self.source.load(i)
                if self.with_digests:
                    digest = self.source.digest(i)
        except (OSError, SyntaxError, ValueError, MemoryError) as e:  # PIL: truncated, corrupt, not an image, too large
            where = self.source.describe(i)
            if not self.skip_bad:
                raise PosthocError(
                    f"cannot read image {where} ({first_line(e)}); replace or remove it, or pass --skip-bad-images to skip "
                    "unreadable images"
                ) from None
            with _SKIPPED.get_lock():
                _SKIPPED.value += 1
            print(printable(f"warning: skipped unreadable image {where} ({first_line(e)})"), file=sys.stderr)
            return None
        try:
            item = (self.transform(image) if self.transform is not None else image), self.targets[i]
        except (RuntimeError, ValueError, TypeError, ZeroDivisionError, OverflowError, MemoryError) as e:
            raise PosthocError(
                f"cannot preprocess image {self.source.describe(i)} ({first_line(e)[:160]}); check --img-size, --crop-pct, "
                "--mean and --std, and the model's own preprocessing (pretrained_cfg)"
            ) from None
        return item if digest is None else (*item, int.from_bytes(bytes.fromhex(digest), "big"))

    def relabel(self, classes: Sequence[str]) -> None:
        """Make targets index ``classes`` (the model's order); every class of the data must be among them."""
        missing = [c for c in self.classes if c not in classes]
        if missing:
            raise PosthocError(f"classes {', '.join(missing[:3])} of the data are not in the class map")
        position = {c: i for i, c in enumerate(classes)}
        remap = [position[c] for c in self.classes]
        self.targets = [remap[t] for t in self.targets]
        self.classes = list(classes)


def content_digests(dataset: Dataset) -> list[str]:
    """The content digests (:func:`image_digest`) of every image of ``dataset`` (an :class:`ImageSet` or a
    subset of one), read from its source; a file that cannot be read has none."""
    base, indices = (dataset.dataset, list(dataset.indices)) if isinstance(dataset, Subset) else (dataset, range(len(dataset)))
    out = []
    for i in indices:
        try:
            out.append(base.source.digest(i))
        except (OSError, SyntaxError, ValueError):
            continue
    return out


def open_split(
    data: str | Path,
    split: str | SplitSpec,
    transform=None,
    *,
    label_names: Sequence[str] | None = None,
    class_map: str | Path | None = None,
    select_size: int | None = None,
    subset: int | None = None,
    skip_bad: bool = False,
) -> Dataset:
    """The images of ``split`` in ``data`` (optionally one part of it, optionally a deterministic subset).

    Args:
        data: a directory of splits, a .tar of one split, ``hfds/NAME``, or a :class:`Source`.
        split: ``"val"``, ``"val:select"``, ``"val:report"`` or a :class:`SplitSpec`.
        transform: applied to each PIL image.
        label_names: the model's class names: the data's classes must be the same set (targets then
            follow the model's order), unless ``class_map`` says otherwise.
        class_map: a file with one class name per line, in the model's class order (timm's format).
        select_size: images in the select part (default 40% of the split).
        subset: keep only this many images, a fixed random sample (seed 0) in sample order.
        skip_bad: skip unreadable images (counted, see :func:`skipped_images`) instead of stopping.
    """
    spec = split if isinstance(split, SplitSpec) else SplitSpec.parse(split)
    source = data if isinstance(data, Source) else open_source(data, spec.split)
    dataset = ImageSet(source, transform, skip_bad=skip_bad)
    align_labels(dataset, label_names, class_map)
    indices = part_indices(dataset.keys, spec.part, select_size)
    if subset is not None:
        if subset <= 0:
            raise PosthocError(f"--subset must be at least 1, got {subset}")
        if subset < len(indices):
            keep = sorted(random.Random(0).sample(range(len(indices)), subset))
            indices = [indices[i] for i in keep]
    if len(indices) == len(dataset):
        return dataset
    view = Subset(dataset, indices)
    view.classes, view.targets = dataset.classes, [dataset.targets[i] for i in indices]
    return view


def from_records(records: Sequence[dict], classes: Sequence[str], **kwargs: Any) -> Source:
    """A :class:`Source` of in-memory ``{"image": ..., "label": ...}`` records, for :func:`open_split`."""
    return records_source(records, classes, **kwargs)


def part_indices(keys: Sequence[str], part: str | None, select_size: int | None = None) -> list[int]:
    """Indices of the select or report part (benchmarks/PROTOCOL.md's rule over sorted keys); all indices for ``part=None``."""
    n = len(keys)
    if part is None:
        return list(range(n))
    order = sorted(range(n), key=keys.__getitem__)
    random.Random(0).shuffle(order)
    k = default_select_size(n) if select_size is None else select_size
    if not 0 < k < n:
        raise PosthocError(f"--select-size {k} must be between 1 and {n - 1} for a split of {n} images")
    chosen = order[:k] if part == "select" else order[k:]
    return sorted(chosen)


def default_select_size(n: int) -> int:
    """Images in the select part of a split of ``n`` images: 40% (2,000 of 5,000)."""
    return max(1, round(DEFAULT_SELECT_FRACTION * n))


def read_class_map(path: str | Path) -> list[str]:
    """Class names in the model's class order, one per line (timm's ``--class-map`` format)."""
    text = read_text_file(path, "class map", "give a text file with one class name per line")
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(set(names)) != len(names) or not names:
        raise PosthocError(f"class map {path} must list each class name once, one per line")
    return names


def align_labels(dataset: ImageSet, label_names: Sequence[str] | None, class_map: str | Path | None = None) -> None:
    """Targets in the model's class order: by ``class_map`` when given, else by the model's label names (the
    same set as the data's classes, any order); a one-line error names the first mismatches."""
    if class_map is not None:
        dataset.relabel(read_class_map(class_map))
        return
    if not label_names or list(label_names) == dataset.classes:
        return
    if sorted(label_names) != sorted(dataset.classes):
        extra = [c for c in dataset.classes if c not in label_names]
        absent = [c for c in label_names if c not in dataset.classes]
        raise PosthocError(
            f"the data's classes do not match the model's label names: {', '.join(extra[:3]) or 'none'} "
            f"{'is' if len(extra) == 1 else 'are'} not among them and {', '.join(absent[:3]) or 'none'} "
            f"{'is' if len(absent) == 1 else 'are'} missing; rename the class folders, or pass --class-map FILE "
            "(the data's class names, one per line, in the model's class order)"
        )
    dataset.relabel(label_names)


# ---------------------------------------------------------------------------------------- loaders
def collate_readable(batch: list) -> Any:
    """``default_collate`` of the samples that could be read (``--skip-bad-images`` gives ``None`` for the others)."""
    items = [b for b in batch if b is not None]
    if not items:
        raise PosthocError(f"none of {len(batch)} images in a batch could be read; check the data (see the warnings above)")
    return default_collate(items)


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
    shard: str | None = None,
) -> DataLoader:
    """A DataLoader with workers and pinned memory (when CUDA is present) by default.

    Shuffling uses a generator seeded with ``seed``, so the same seed gives the same batch order.
    ``sample`` (indices, repeats allowed: a bootstrap sample) replaces the dataset by those images, in
    a seeded random order.

    With several processes (:mod:`posthoc.distributed`), ``shard`` splits the batches among them:
    ``"batches"`` gives each process whole batches of the single-process batching (evaluation and
    caching: every image to exactly one process, outputs bit-identical), ``"split"`` cuts every batch of
    ``batch_size * processes`` images into one ``batch_size`` slice per process (data-parallel training:
    ``batch_size`` is per process, as in timm). With one process ``shard`` changes nothing.
    """
    if shard not in (None, "batches", "split"):
        raise ValueError(f"shard must be None, 'batches' or 'split', got {shard!r}")
    workers = default_workers() if workers is None else workers
    generator = seeded_generator(seed)
    sampler = None
    if sample is not None:
        sampler, shuffle = SubsetRandomSampler(list(sample), generator=generator), False
    size = len(dataset) if sample is None else len(sample)
    options = dict(
        collate_fn=collate_readable,
        num_workers=workers,
        pin_memory=torch.cuda.is_available() if pin_memory is None else pin_memory,
        persistent_workers=False,
        generator=generator,
    )
    if shard is not None and distributed.world_size() > 1:
        if sampler is None:
            sampler = RandomSampler(dataset, generator=generator) if shuffle else SequentialSampler(dataset)
        if shard == "split":
            if size < distributed.world_size():
                raise PosthocError(
                    f"{size} training images cannot be split among {distributed.world_size()} processes; use more images or fewer processes"
                )
            global_batch = batch_size * distributed.world_size()
            batches = BatchSampler(sampler, global_batch, drop_last and size > global_batch)
            return DataLoader(dataset, batch_sampler=distributed.SplitBatches(batches), **options)
        batches = BatchSampler(sampler, batch_size, drop_last and size > batch_size)
        return DataLoader(dataset, batch_sampler=distributed.ShardedBatches(batches), **options)
    drop_last = drop_last and size > batch_size  # never drop the only batch
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, sampler=sampler, drop_last=drop_last, **options)
