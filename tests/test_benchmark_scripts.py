"""The benchmark scripts users run on their own data still run end to end (tiny settings)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_imagenet_benchmark_smoke_run(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "benchmarks/imagenet.py",
            "--smoke",
            "--smoke-models",
            "test_resnet",
            "--methods",
            "resample,sparse",
            "--time-batches",
            "4,8",
            "--out",
            str(tmp_path),
            "--name",
            "smoke",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads((tmp_path / "smoke.json").read_text())["rows"]
    assert [row["method"] for row in rows] == ["parent", "resample", "sparse"]
    assert all(row["images"] == 120 for row in rows)  # val:report of 10 x 20 images
    assert rows[2]["members"] == 2 and rows[2]["flops_ratio"] == 2.0 and rows[1]["parent_epochs"] > 0
    assert "python benchmarks/imagenet.py --data /data/imagenet" in (tmp_path / "smoke.md").read_text()


def test_gpu_benchmark_without_a_gpu_says_so_and_writes_nothing(tmp_path):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(
        [sys.executable, "benchmarks/gpu.py", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "no CUDA GPU on this machine: nothing measured" in r.stdout and not (tmp_path / "out").exists()


def _verdict():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import verdict
    finally:
        sys.path.pop(0)
    return verdict


def _row(key, pe, flops, top1, nll):
    return {"key": key, "parent_epochs": pe, "flops_ratio": flops, "top1": top1, "nll": nll}


def test_domination_rule_on_a_made_up_table():
    v = _verdict()
    table = [
        _row("parent", 0, 1, 80.0, 0.60),
        _row("flip", 0, 2, 81.0, 0.55),  # more FLOPs: not comparable with the parent, better otherwise
        _row("tie", 0, 1, 80.0, 0.60),  # equal in all four to the parent: neither dominates
        _row("longer", 4, 1, 81.5, 0.54),
        _row("method", 4, 3, 81.0, 0.56),  # dominated by flip (cheaper in training, fewer FLOPs, better) and longer
        _row("same-acc", 4, 3, 81.5, 0.54),  # equal to longer on top-1/NLL but more FLOPs: dominated by longer
        _row("nll-missing", 1, 1, 99.0, None),  # no NLL: compared with no row
        _row("better-nll-only", 4, 3, 80.0, 0.50),  # worse top-1 than longer, better NLL: on the front
    ]
    assert v.verdicts(table) == {
        "parent": None,
        "flip": None,
        "tie": None,
        "longer": None,
        "method": "flip",  # the cheapest row that dominates it is named
        "same-acc": "longer",
        "nll-missing": None,
        "better-nll-only": None,
    }
    assert v.dominates(table[3], table[4]) and not v.dominates(table[0], table[2]) and not v.dominates(table[2], table[0])
    assert not v.dominates(table[6], table[0]) and not v.dominates(table[0], table[6])


def test_domination_reads_the_benchmark_records_metrics():
    """cifar10.py's records keep top-1 and NLL under ``metrics``: the rule must read them there (it once saw
    no figures in any record and put every row on the front)."""
    v = _verdict()

    def record(key, pe, flops, top1, nll):
        return {"key": key, "parent_epochs": pe, "flops_ratio": flops, "metrics": {"top1": top1, "nll": nll, "ece": 1.0}}

    table = [record("calib", 0.07, 2, 85.6, 0.435), record("longer", 4.8, 2, 84.2, 0.445), record("noisy", 1.1, 18, 85.0, 0.432)]
    assert v.verdicts(table) == {"calib": None, "longer": "calib", "noisy": None}
