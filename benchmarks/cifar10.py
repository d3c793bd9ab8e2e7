"""CIFAR-10 / ResNet-18 accuracy benchmark, following ``../shared/BENCH.md``.

    python benchmarks/cifar10.py --shared ../shared --out benchmarks/results [--rows parent,deep4,noisy]

Every row is an ordinary ``posthoc`` command line (run as a subprocess, timed), evaluated with
``posthoc eval ART --split val:report`` (posthoc's ``val:select`` / ``val:report`` parts are exactly
BENCH.md's split: sorted paths, ``random.Random(0).shuffle``, first 2,000 select). In the same run the
script measures one training epoch of the parent over ``train/`` (forward + backward + SGD step, batch
128) at its start and again at its end (costs use the mean, so a machine that slows down or speeds up
during the run biases them less), and every artifact's CPU throughput at batch 256 alternating with the
parent's over a few rounds, so costs read as "parent-epochs" and speeds as ratios.

Results: ``cifar10_resnet18.json`` (one record per row; rows not run this time keep their last
record), ``cifar10_resnet18.md`` (the table, also copied into the README between the results
markers) and ``cifar10_reliability.png`` (a reliability curve per row).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARENT_EPOCHS_OF_PARENT = 15  # BENCH.md: the parents took 15 epochs each


@dataclass
class Row:
    """One table row: a posthoc command that builds an artifact (None: evaluate the parent itself)."""

    key: str
    name: str
    build: list[str] | None
    nominal_parent_epochs: float | None = None  # cost fixed by the protocol instead of measured
    base_parent_epochs: float = 0.0  # training the row's inputs costs this much on top of the build
    notes: str = ""
    extra: dict = field(default_factory=dict)


def rows(parents: list[str]) -> list[Row]:
    """The benchmark's rows; ``{data}`` and ``{out}`` are filled in at run time."""
    p0 = parents[0]
    boost = ["boost", p0, "--data", "{data}", "--out", "{out}", "--overwrite", "--no-progress"]
    return [
        Row("parent", "parent", None, nominal_parent_epochs=0.0, notes="s0 as trained (15 epochs)"),
        Row(
            "deep4",
            "deep ensemble (4)",
            ["ensemble", *parents, "--out", "{out}", "--overwrite"],
            nominal_parent_epochs=4 * PARENT_EPOCHS_OF_PARENT,
            notes="s0..s3, probability mean; cost = 4 x 15 epochs",
        ),
        Row("noisy", "noisy", [*boost[:2], "--method", "noisy", *boost[2:]], notes="defaults"),
        Row(
            "noisy-scope",
            "noisy --last-layers 3",
            [*boost[:2], "--method", "noisy", *boost[2:], "--last-layers", "3"],
            notes="mutations in the classifier and the last 2 blocks only",
        ),
        Row(
            "resample-mean",
            "resample-mean",
            [*boost[:2], "--method", "resample", *boost[2:], "--members", "1", "--include-mean"],
            notes="one fine-tune epoch, the Welford mean model",
        ),
        Row("resample", "resample K=8", [*boost[:2], "--method", "resample", *boost[2:]], notes="defaults"),
        Row("lastlayer", "lastlayer", [*boost[:2], "--method", "lastlayer", *boost[2:]], notes="s0, retraining only"),
        Row(
            "supernet",
            "supernet (s0)",
            [*boost[:2], "--method", "supernet", *boost[2:]],
            notes="4 copies of s0 with retrained last layers, coupled",
        ),
        Row(
            "supernet4",
            "supernet (s0..s3)",
            ["boost", *parents, *boost[2:], "--method", "supernet"],
            base_parent_epochs=4 * PARENT_EPOCHS_OF_PARENT,
            notes="couples the deep ensemble's four parents; cost includes their 4 x 15 training epochs",
        ),
    ]


# ------------------------------------------------------------------------------------------ data
def prepare_data(shared: Path, cache: Path) -> Path:
    """Unpack ``cifar10-trainval.tar.gz`` once into ``cache`` and check BENCH.md's counts."""
    root = cache / "cifar10"
    marker = cache / ".unpacked"
    if not marker.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(shared / "data" / "cifar10-trainval.tar.gz") as tar:
            tar.extractall(cache, filter="data")
        marker.write_text("ok")
    from posthoc.data import open_split

    counts = {s: len(open_split(root, s)) for s in ("train", "val:select", "val:report")}
    expected = {"train": 45000, "val:select": 2000, "val:report": 3000}
    if counts != expected:
        raise SystemExit(f"unexpected CIFAR-10 layout {counts}, BENCH.md expects {expected}")
    return root


# ----------------------------------------------------------------------------------- measurements
def parent_epoch_seconds(parent: str, data: Path) -> float:
    """Wall time of one training epoch of the parent over train/ (batch 128, SGD), as BENCH.md says."""
    from posthoc import load_model
    from posthoc.data import make_loader, open_split, resolve_data_config, train_transform

    model = load_model(parent)
    loader = make_loader(
        open_split(data, "train", train_transform(resolve_data_config(model))), 128, shuffle=True, drop_last=True
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    model.train()
    start = time.perf_counter()
    for x, y in loader:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return time.perf_counter() - start


def speed_ratio(model: torch.nn.Module, parent: torch.nn.Module, rounds: int = 3, seconds: float = 1.0) -> float:
    """``model``'s images/s over ``parent``'s, measured alternately over ``rounds`` rounds (median of each)."""
    a, b = [], []
    for _ in range(rounds):
        b.append(images_per_second(parent, seconds=seconds))
        a.append(images_per_second(model, seconds=seconds))
    return statistics.median(a) / statistics.median(b)


@torch.inference_mode()
def images_per_second(model: torch.nn.Module, batch: int = 256, seconds: float = 3.0) -> float:
    """CPU images/s at ``batch`` (random inputs of the model's size, after one warm-up pass)."""
    size = tuple(model.pretrained_cfg["input_size"])
    x = torch.randn(batch, *size, generator=torch.Generator().manual_seed(0))
    model.eval()(x)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        model(x)
        n += 1
    return n * batch / (time.perf_counter() - start)


def run(cmd: list[str], log: Path) -> float:
    """Run ``posthoc CMD``; return wall seconds. Output goes to ``log``."""
    start = time.perf_counter()
    with log.open("w") as f:
        proc = subprocess.run([sys.executable, "-m", "posthoc", *cmd], stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    if proc.returncode:
        raise SystemExit(f"command failed ({proc.returncode}): posthoc {shlex.join(cmd)}; see {log}")
    return time.perf_counter() - start


# ---------------------------------------------------------------------------------------- output
def write_table(records: list[dict], path: Path) -> str:
    head = (
        "| row | top-1 (%) | NLL | ECE (%) | Brier | members | params (M) | MB | cost (s) | parent-epochs | "
        "inference (x parent) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        m = r["metrics"]
        lines.append(
            f"| {r['name']} | {m['top1']:.2f} | {m['nll']:.4f} | {m['ece']:.2f} | {m['brier']:.4f} | {r['members']} | "
            f"{r['params_m']:.1f} | {r['artifact_mb']:.1f} | {r['wall_seconds']:.0f} | {r['parent_epochs']:.2f} | "
            f"{r['inference_ratio']:.2f} |"
        )
    table = "\n".join(lines)
    first = records[0] if records else {}
    text = (
        "# CIFAR-10, ResNet-18 parents (protocol: ../shared/BENCH.md)\n\n"
        "Metrics on the 3,000-image **report** part of `val/`; everything was tuned on the 2,000-image select part.\n"
        "Cost: the method's wall time, and that time over one parent training epoch measured in the same run "
        "(deep ensemble: 4 x 15 training epochs, by the protocol). Inference: CPU images/s at batch 256 over the parent's.\n\n"
        f"{table}\n\n"
        f"Machine: {first.get('machine', '?')}; torch {first.get('torch', '?')}, timm {first.get('timm', '?')}; "
        f"one parent epoch = {first.get('parent_epoch_seconds', float('nan')):.1f} s in the run that produced each row "
        "(per-row values in the JSON).\n"
    )
    path.write_text(text)
    return table


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        readme.write_text(f"{before}{start}\n{table}\n{end}{after}")


def plot_reliability(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 5.5))
    ax.plot([0, 1], [0, 1], color="0.6", linestyle="--", linewidth=1, label="perfect calibration")
    for r in records:
        bins = [b for b in r.get("reliability", []) if b["count"] > 0]
        if bins:
            ax.plot(
                [b["confidence"] for b in bins],
                [b["accuracy"] for b in bins],
                marker="o",
                markersize=3,
                label=f"{r['name']} (ECE {r['metrics']['ece']:.2f}%)",
            )
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.set_title("CIFAR-10 report split: reliability")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    ap.add_argument("--rows", default="all", help="comma-separated row keys, or 'all'")
    args = ap.parse_args()

    import timm

    from posthoc import load, load_model
    from posthoc.artifact import size_mb

    parents = [str(args.shared / "parents" / f"resnet18_cifar10_s{i}") for i in range(4)]
    all_rows = rows(parents)
    wanted = [r for r in all_rows if args.rows == "all" or r.key in args.rows.split(",")]
    unknown = set(args.rows.split(",")) - {r.key for r in all_rows} - {"all"}
    if unknown:
        raise SystemExit(f"unknown rows {sorted(unknown)}; known: {', '.join(r.key for r in all_rows)}")
    data = prepare_data(args.shared, args.cache)
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.cache / "runs"
    work.mkdir(parents=True, exist_ok=True)

    print("measuring one parent training epoch ...", flush=True)
    epoch_s = parent_epoch_seconds(parents[0], data)
    print(f"  {epoch_s:.1f} s", flush=True)
    parent_model = load_model(parents[0])

    results_file = args.out / "cifar10_resnet18.json"
    previous = {r["key"]: r for r in json.loads(results_file.read_text())} if results_file.exists() else {}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
    for row in wanted:
        print(f"row {row.name} ...", flush=True)
        art = work / row.key
        cmd = None
        if row.build is None:
            target, wall = parents[0], 0.0
        else:
            cmd = [a.format(data=data, out=art) for a in row.build]
            wall = run(cmd, work / f"{row.key}.build.log")
            target = str(art)
        result_json = work / f"{row.key}.eval.json"
        run(
            ["eval", target, "--data", str(data), "--split", "val:report", "--results-file", str(result_json), "--no-progress"],
            work / f"{row.key}.eval.log",
        )
        result = json.loads(result_json.read_text())
        ratio = speed_ratio(load(art), parent_model) if row.build is not None else 1.0
        cost = row.nominal_parent_epochs if row.nominal_parent_epochs is not None else row.base_parent_epochs + wall / epoch_s
        previous[row.key] = {
            "key": row.key,
            "name": row.name,
            "command": "posthoc " + shlex.join(cmd) if cmd else f"posthoc eval {parents[0]} (no build)",
            "notes": row.notes,
            "metrics": {k: result[k] for k in ("top1", "top5", "nll", "ece", "brier")},
            "member_top1": result.get("member_top1"),
            "disagreement": result.get("disagreement"),
            "members": result.get("members", 1),
            "params_m": result["param_count"],
            "artifact_mb": size_mb(art) if row.build is not None else size_mb(parents[0]),
            "wall_seconds": round(wall, 1),
            "parent_epoch_seconds": round(epoch_s, 2),
            "parent_epochs": round(cost, 3),
            "inference_ratio": round(ratio, 3),
            "reliability": result["reliability"],
            "torch": torch.__version__,
            "timm": timm.__version__,
            "machine": machine,
        }
        m = previous[row.key]["metrics"]
        print(
            f"  top-1 {m['top1']:.2f}  NLL {m['nll']:.4f}  ECE {m['ece']:.2f}  cost {cost:.2f} parent-epochs  "
            f"inference x{ratio:.2f}",
            flush=True,
        )
        results_file.write_text(json.dumps(list(_ordered(previous, all_rows)), indent=1) + "\n")

    if any(r.build is not None and r.nominal_parent_epochs is None for r in wanted):
        print("measuring one parent training epoch again ...", flush=True)
        second = parent_epoch_seconds(parents[0], data)
        mean_s = (epoch_s + second) / 2
        print(f"  {second:.1f} s; costs use the mean, {mean_s:.1f} s", flush=True)
        for row in wanted:
            rec = previous[row.key]
            rec["parent_epoch_seconds"] = round(mean_s, 2)
            rec["parent_epoch_seconds_start_end"] = [round(epoch_s, 2), round(second, 2)]
            if row.build is not None and row.nominal_parent_epochs is None:
                rec["parent_epochs"] = round(row.base_parent_epochs + rec["wall_seconds"] / mean_s, 3)
        results_file.write_text(json.dumps(list(_ordered(previous, all_rows)), indent=1) + "\n")
    records = list(_ordered(previous, all_rows))
    table = write_table(records, args.out / "cifar10_resnet18.md")
    plot_reliability(records, args.out / "cifar10_reliability.png")
    update_readme(table)
    print(table)


def _ordered(records: dict, all_rows: list[Row]):
    keys = [r.key for r in all_rows]
    return (records[k] for k in keys + sorted(set(records) - set(keys)) if k in records)


if __name__ == "__main__":
    main()
