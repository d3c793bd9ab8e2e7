"""ImageFolder splits, the select/report rule of benchmarks/PROTOCOL.md, subsets, transforms and data errors."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from posthoc import PosthocError
from posthoc.data import SplitSpec, open_split, resolve_data_config, train_transform

from .helpers import tiny_model


def paths(ds):
    base = ds.dataset if hasattr(ds, "dataset") else ds
    idx = ds.indices if hasattr(ds, "indices") else range(len(base))
    return [Path(base.samples[i][0]).relative_to(Path(base.root)).as_posix() for i in idx]


def test_select_and_report_follow_bench_rule(image_data):
    full = paths(open_split(image_data, "val"))
    order = sorted(full)
    random.Random(0).shuffle(order)
    select = paths(open_split(image_data, "val:select"))
    report = paths(open_split(image_data, "val:report"))
    assert len(select) == round(0.4 * len(full)) == 24
    assert set(select) == set(order[:24]) and set(report) == set(order[24:])
    assert not set(select) & set(report)
    assert paths(open_split(image_data, "val:select", select_size=10)) == sorted(order[:10], key=full.index)


def test_subset_is_deterministic_and_sized(image_data):
    a = paths(open_split(image_data, "train", subset=17))
    b = paths(open_split(image_data, "train", subset=17))
    assert a == b and len(a) == 17 and len(set(a)) == 17


def test_targets_follow_model_label_names(image_data):
    ds = open_split(image_data, "val", label_names=["stripes", "square", "circle"])
    assert ds.classes == ["stripes", "square", "circle"]
    path, target = ds.samples[0]
    assert Path(path).parent.name == ds.classes[target]


def test_preprocessing_comes_from_model_and_overrides_win():
    model = tiny_model()
    cfg = resolve_data_config(model)
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0 and cfg["std"] == (0.25, 0.25, 0.25)
    cfg = resolve_data_config(model, {"img_size": 40, "crop_pct": 0.875, "mean": (0.1, 0.2, 0.3)})
    assert cfg["input_size"] == (3, 40, 40) and cfg["crop_pct"] == 0.875 and cfg["mean"] == (0.1, 0.2, 0.3)


def test_light_train_transform_keeps_input_size(image_data):
    ds = open_split(image_data, "train", train_transform(resolve_data_config(tiny_model())))
    assert ds[0][0].shape == (3, 32, 32)


def test_missing_data_directory(tmp_path):
    with pytest.raises(PosthocError, match="does not exist; pass --data"):
        open_split(tmp_path / "nope", "val")


def test_missing_split_lists_available(image_data):
    with pytest.raises(PosthocError, match="split 'test' not found .*it has: train, val"):
        open_split(image_data, "test")


def test_split_without_images(tmp_path):
    (tmp_path / "val" / "cat").mkdir(parents=True)
    (tmp_path / "val" / "cat" / "notes.txt").write_text("no images here")
    with pytest.raises(PosthocError, match="no images in"):
        open_split(tmp_path, "val")


def test_bad_split_part():
    with pytest.raises(PosthocError, match="unknown split part 'test'"):
        SplitSpec.parse("val:test")
