"""Scripted evaluation as timm's validate.py users run it: tars and datasets, model lists and wildcards,
label subsets, ReaL labels, mixed precision."""

from __future__ import annotations

import csv
import json
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, TensorDataset

from posthoc.cli import main
from posthoc.commands.eval import evaluate_spec
from posthoc.data import from_records, open_split
from posthoc.evaluate import evaluate
from posthoc.sources import expand_specs

from .helpers import CLASSES, QUIET, save_hub_layout, tiny_model

SHARED = Path(__file__).resolve().parents[2] / "shared"


def _metrics(result: dict) -> tuple:
    return result["images"], result["top1"], result["top5"], result["nll"], result["ece"]


def test_folder_tar_and_in_memory_dataset_give_the_same_metrics(tmp_path, resnet_dir, image_data):
    archive = tmp_path / "val.tar"
    with tarfile.open(archive, "w") as tar:
        for cls in CLASSES:
            tar.add(image_data / "val" / cls, arcname=cls)
    folder = evaluate_spec(str(resnet_dir), image_data, "val", workers=0, progress=False)
    packed = evaluate_spec(str(resnet_dir), archive, "val", workers=0, progress=False)
    dataset = open_split(image_data, "val")
    records = [{"image": Image.open(path), "label": label} for path, label in dataset.samples]
    in_memory = evaluate_spec(str(resnet_dir), from_records(records, dataset.classes), "val", workers=0, progress=False)
    assert _metrics(folder) == _metrics(packed) == _metrics(in_memory)
    # keys of a tar are its member names, so its parts are the folder's parts
    report = [evaluate_spec(str(resnet_dir), d, "val:report", workers=0, progress=False) for d in (image_data, archive)]
    assert _metrics(report[0]) == _metrics(report[1])


def test_model_list_with_a_broken_spec_writes_every_row_and_exits_1(tmp_path, capsys, resnet_dir, image_data):
    other = save_hub_layout(tiny_model("test_resnet", seed=4), tmp_path / "other")
    model_list = tmp_path / "models.txt"
    model_list.write_text(f"# two good models and a typo\n{resnet_dir}\nresnet5O   # no such model\n{other}\n")
    results = tmp_path / "r.csv"
    code = main(
        [
            "eval",
            "--model-list",
            str(model_list),
            "--data",
            str(image_data),
            *QUIET,
            "--results-file",
            str(results),
            "--sort",
            "top1",
        ]
    )
    assert code == 1
    rows = list(csv.DictReader(results.open()))
    assert len(rows) == 3 and {r["model"] for r in rows} == {str(resnet_dir), "resnet5O", str(other)}
    broken = next(r for r in rows if r["model"] == "resnet5O")
    assert "unknown model 'resnet5O'" in broken["error"] and not broken["top1"]
    good = [float(r["top1"]) for r in rows if r["top1"]]
    assert good == sorted(good, reverse=True) and rows[-1]["model"] == "resnet5O"  # sorted, failures last
    assert "1 of 3 models failed" in capsys.readouterr().err


def test_wildcards_expand_over_timm_pretrained_names():
    names = expand_specs(["resnet5*.a1_in1k"])
    assert "resnet50.a1_in1k" in names and all(n.startswith("resnet5") and n.endswith(".a1_in1k") for n in names)
    with pytest.raises(Exception, match="no timm pretrained model matches"):
        expand_specs(["nothing*like.this"])


def test_valid_labels_equal_a_reheaded_model_restricted_to_those_classes(tmp_path, image_data):
    big = tiny_model("test_resnet", num_classes=5, seed=2)
    wide = save_hub_layout(big, tmp_path / "five")
    valid = [4, 0, 2]  # the data's three classes are the model's classes 4, 0 and 2
    (tmp_path / "valid.txt").write_text("\n".join(map(str, valid)) + "\n")
    small = tiny_model("test_resnet", num_classes=3, seed=2)
    small.load_state_dict({**big.state_dict(), "fc.weight": big.fc.weight[valid], "fc.bias": big.fc.bias[valid]})
    narrow = save_hub_layout(small, tmp_path / "three")
    restricted = evaluate_spec(str(wide), image_data, "val", valid_labels=tmp_path / "valid.txt", workers=0, progress=False)
    reheaded = evaluate_spec(str(narrow), image_data, "val", workers=0, progress=False)
    assert restricted["top1"] == reheaded["top1"] and restricted["nll"] == pytest.approx(reheaded["nll"], abs=1e-5)


def test_real_labels_count_any_label_of_the_set():
    logits = torch.tensor([[5.0, 1, 0], [0, 5, 1], [1, 0, 5], [5, 0, 1], [0, 1, 5]])  # predictions 0, 1, 2, 0, 2
    loader = DataLoader(TensorDataset(logits, torch.tensor([0, 0, 0, 1, 1])), batch_size=2)
    loader.dataset.classes = ["a", "b", "c"]
    real = [[0], [0, 1], [], [1], [1, 2]]  # correct, correct, not counted, wrong, correct
    r = evaluate(torch.nn.Identity(), loader, real_labels=real, show_progress=False)
    assert r["top1"] == pytest.approx(300 / 4) and r["real_images"] == 4
    assert r["top1_original"] == pytest.approx(100 * 1 / 5)  # plain labels: only the first image is right


def test_real_labels_file_maps_imagenet_file_names(tmp_path, resnet_dir):
    root = tmp_path / "data" / "val"
    for i in range(1, 7):
        folder = root / CLASSES[i % 3]
        folder.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32), (40 * i, 0, 0)).save(folder / f"ILSVRC2012_val_{i:08d}.JPEG", format="PNG")
    (tmp_path / "real.json").write_text(json.dumps([[0], [0, 1, 2], [], [1], [2], [0]]))
    r = evaluate_spec(str(resnet_dir), tmp_path / "data", "val", real_labels=tmp_path / "real.json", workers=0, progress=False)
    assert r["real_images"] == 5 and "top1_original" in r


@pytest.mark.skipif(
    not (SHARED / "data" / "cifar10-trainval.tar.gz").is_file(), reason="needs ../shared (CIFAR-10 and its parents)"
)
def test_bfloat16_autocast_on_cpu_is_within_half_a_point_of_float32(tmp_path):
    per_class, taken = 100, {}
    with tarfile.open(SHARED / "data" / "cifar10-trainval.tar.gz") as tar:
        for member in tar:
            parts = Path(member.name).parts
            if member.isfile() and len(parts) >= 4 and parts[-3] == "val" and taken.get(parts[-2], 0) < per_class:
                taken[parts[-2]] = taken.get(parts[-2], 0) + 1
                target = tmp_path / "val" / parts[-2] / parts[-1]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(tar.extractfile(member).read())
    parent = str(SHARED / "parents" / "resnet18_cifar10_s0")
    full = evaluate_spec(parent, tmp_path, "val", workers=0, progress=False)
    mixed = evaluate_spec(parent, tmp_path, "val", amp=True, workers=0, progress=False)
    assert full["images"] == 1000 and abs(full["top1"] - mixed["top1"]) <= 0.5
