"""The label space: the one check that models and data agree on their classes, and the label files timm's
``validate.py`` takes: ``--valid-labels`` (the model's class indices of a subset such as ImageNet-A's 200 of
1000) and ``--real-labels`` (ImageNet-ReaL's ``real.json``)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .errors import PosthocError
from .paths import read_json_file, read_text_file


def check_label_space(specs: Sequence[str], models: Sequence[Any], data_classes: int | None = None) -> None:
    """Models used together predict the same classes in the same order (and the data has as many classes as
    they predict); one line naming the first model that differs."""
    first = models[0]
    for spec, model in zip(specs[1:], models[1:]):
        if model.num_classes != first.num_classes:
            raise PosthocError(
                f"{spec} predicts {model.num_classes} classes but {specs[0]} predicts {first.num_classes}; "
                "models used together must share a label space"
            )
        a, b = first.pretrained_cfg.get("label_names"), model.pretrained_cfg.get("label_names")
        if a and b and list(a) != list(b):
            raise PosthocError(
                f"{spec} orders its classes differently from {specs[0]}; models used together must share a label space"
            )
    if data_classes is not None:
        check_data_classes(first.num_classes, data_classes)


def check_data_classes(
    expected: int, data_classes: int, what: str = "the model predicts", class_map: str | Path | None = None
) -> None:
    """The data has as many classes as the model predicts (or ``--valid-labels`` lists): the one wording; with
    ``class_map``, the classes counted are the ones the class map lists, and the line says so."""
    if expected == data_classes:
        return
    if class_map is not None:
        raise PosthocError(
            f"{what} {expected} classes but the class map {class_map} lists {data_classes}; list the model's classes, "
            "one name per line in its class order, each the name of a class folder of the data"
        )
    raise PosthocError(
        f"{what} {expected} classes but the data has {data_classes} classes; point --data at data of that label "
        "space, or map the data's classes onto the model's with --class-map FILE (or --valid-labels FILE for a subset)"
    )


def read_valid_labels(path: str | Path) -> list[int]:
    """Class indices, one per line (timm's ``--valid-labels`` format, e.g. ImageNet-A's 200 of 1000)."""
    try:
        text = read_text_file(path, "--valid-labels file")
        labels = [int(line.split()[0]) for line in text.splitlines() if line.strip()]
    except ValueError:
        raise PosthocError(f"--valid-labels {path} must hold one class index per line") from None
    if not labels or len(set(labels)) != len(labels):
        raise PosthocError(f"--valid-labels {path} must list each class index once")
    return labels


def read_real_labels(path: str | Path, dataset) -> list[list[int]]:
    """The ImageNet-ReaL label sets (``real.json``: a list, entry ``i`` for ``ILSVRC2012_val_{i+1:08d}.JPEG``)
    of the images of ``dataset`` in its order."""
    table = read_json_file(path, "--real-labels file")
    if not isinstance(table, list) or not all(
        isinstance(entry, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in entry) for entry in table
    ):
        raise PosthocError(f"--real-labels {path} must be a JSON list of label lists (ImageNet-ReaL's real.json)")
    samples = dataset.dataset.samples if hasattr(dataset, "indices") else dataset.samples
    order = dataset.indices if hasattr(dataset, "indices") else range(len(samples))
    out = []
    for i in order:
        name = Path(samples[i][0]).name
        match = re.fullmatch(r"ILSVRC2012_val_(\d{8})\.\w+", name)
        if match is None or not 0 < int(match.group(1)) <= len(table):
            raise PosthocError(
                f"--real-labels maps ImageNet validation file names (ILSVRC2012_val_NNNNNNNN.JPEG); '{name}' is not one"
            )
        out.append(list(table[int(match.group(1)) - 1]))
    return out
