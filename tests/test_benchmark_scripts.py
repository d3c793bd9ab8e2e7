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
