"""``posthoc eval``: timm validate.py fields, results files, and one-line errors with exit code 2."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from posthoc.cli import main
from posthoc.data import eval_transform, open_split, resolve_data_config
from posthoc.sources import load_model

from .helpers import QUIET


def run(capsys, *args):
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_eval_matches_a_direct_timm_computation(capsys, tmp_path, resnet_dir, image_data):
    code, out, err = run(
        capsys,
        "eval",
        resnet_dir,
        "--data",
        image_data,
        "--split",
        "val",
        "--workers",
        0,
        "--batch-size",
        16,
        "--results-file",
        tmp_path / "r.json",
        "--no-progress",
    )
    assert code == 0, err
    result = json.loads((tmp_path / "r.json").read_text())
    for field in (
        "model",
        "top1",
        "top1_err",
        "top5",
        "top5_err",
        "param_count",
        "img_size",
        "crop_pct",
        "interpolation",
        "nll",
        "ece",
        "brier",
        "throughput",
    ):
        assert field in result
    assert result["img_size"] == 32 and result["crop_pct"] == 1.0 and result["interpolation"] == "bilinear"
    # the same numbers computed directly with timm's transforms
    model = load_model(str(resnet_dir))
    ds = open_split(image_data, "val", eval_transform(resolve_data_config(model)))
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    y = torch.tensor(ds.targets)
    with torch.no_grad():
        logits = model(x)
    top1 = 100 * (logits.argmax(1) == y).float().mean().item()
    nll = torch.nn.functional.cross_entropy(logits, y).item()
    assert result["top1"] == pytest.approx(top1, abs=1e-3)
    assert result["top1_err"] == pytest.approx(100 - top1, abs=1e-3)
    assert result["nll"] == pytest.approx(nll, abs=1e-4)
    assert result["param_count"] == round(sum(p.numel() for p in model.parameters()) / 1e6, 2)
    assert "top-1" in out


def test_eval_csv_and_select_part(capsys, tmp_path, resnet_dir, image_data):
    code, _, err = run(
        capsys,
        "eval",
        resnet_dir,
        "--data",
        image_data,
        "--split",
        "val:report",
        "--workers",
        0,
        "--results-file",
        tmp_path / "r.csv",
        "--no-progress",
        "--subset",
        10,
    )
    assert code == 0, err
    row = next(csv.DictReader((tmp_path / "r.csv").open()))
    assert row["split"] == "val:report" and int(row["images"]) == 10


@pytest.mark.parametrize(
    "args, message",
    [
        (["eval", "resnet5O", "--data", "{data}"], "unknown model 'resnet5O'; did you mean"),
        (["eval", "{model}", "--data", "{data}/nope"], "data directory .* does not exist"),
        (["eval", "{model}", "--data", "{data}", "--split", "test"], "split 'test' not found"),
        (
            ["eval", "{model}", "--data", "{data}", "--num-classes", "5"],
            "--num-classes 5 would give .* a new, untrained classifier",
        ),
        (["eval", "{model}", "--data", "{data}", "--device", "cuda"], "no CUDA GPU is available; use --device cpu"),
        (["eval", "{model}/model.safetensors", "--data", "{data}"], "bare weights file; also pass --arch"),
        (["eval", "{model}", "--data", "{data}", "--results-file", "out.txt"], "must end in .json or .csv"),
    ],
)
def test_eval_errors_are_one_line(capsys, monkeypatch, resnet_dir, image_data, args, message):
    import re

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = [a.format(model=resnet_dir, data=image_data) for a in args]
    code, _out, err = run(
        capsys,
        *args,
        *QUIET,
    )
    assert code == 2
    text = " ".join(err.split())
    assert re.search(message, text), text
    assert "Traceback" not in err and text.startswith("error:")
