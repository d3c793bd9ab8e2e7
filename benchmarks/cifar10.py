"""CIFAR-10 / ResNet-18 accuracy benchmark, following ``benchmarks/PROTOCOL.md``.

    python benchmarks/cifar10.py --shared ../shared --out benchmarks/results [--rows parent,deep4,noisy]

Every row is an ordinary ``posthoc`` command line (run as a subprocess, timed), evaluated with
``posthoc eval ART --split val:report`` (posthoc's ``val:select`` / ``val:report`` parts are exactly
the protocol's split: sorted paths, ``random.Random(0).shuffle``, first 2,000 select). In the same run the
script measures one training epoch of the parent over ``train/`` (forward + backward + SGD step, batch
128) at its start and again at its end (costs use the mean, so a machine that slows down or speeds up
during the run biases them less), and every artifact's CPU throughput at batch 256 alternating with the
parent's over a few rounds, so costs read as "parent-epochs" and speeds as ratios.

Besides posthoc's own rows it runs the alternatives a user would reach for (``peers.py``): temperature
scaling (``posthoc calibrate``), SWA for one epoch (``torch.optim.swa_utils``) and last-layer Laplace
(``laplace-torch``, in the ``bench`` extra only), on the same parent and splits. Distillation rows also
record the share of their teacher's gain over the parent that the student keeps.

Columns: metrics on the report part; members; parameters; size; the method's wall time and that time
in parent-epochs; the artifact's forward FLOPs and its measured forward time at batch 256, both over the
parent's (the time ratio alternates artifact and parent over rounds and keeps the medians).

Results: ``cifar10_resnet18.json`` (one record per row; rows not run this time keep their last
record), ``cifar10_resnet18.md`` (the table, also copied into the README between the results
markers), ``cifar10_reliability.png`` (a reliability curve per row) and ``cifar10_pareto.png``
(NLL and top-1 gain over the parent against inference time).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
PARENT_EPOCHS_OF_PARENT = 15  # benchmarks/PROTOCOL.md: the 15-epoch parents


@dataclass
class Row:
    """One table row: a posthoc command that builds an artifact (None: the parent itself), or a peer."""

    key: str
    name: str
    build: list[str] | None = None
    peer: str | None = None  # "swa" or "laplace" (peers.py)
    nominal_parent_epochs: float | None = None  # cost fixed by the protocol instead of measured
    base_parent_epochs: float = 0.0  # training the row's inputs costs this much on top of the build
    teacher: str | None = None  # distillation: the row whose artifact taught this one
    notes: str = ""
    extra: dict = field(default_factory=dict)


def rows(parents: list[str]) -> list[Row]:
    """The benchmark's rows; ``{data}``, ``{out}`` and ``{runs}`` are filled in at run time."""
    p0 = parents[0]
    common = ["--data", "{data}", "--out", "{out}", "--overwrite", "--no-progress"]

    def boost(method: str, *flags: str) -> list[str]:
        return ["boost", p0, "--method", method, *common, *flags]

    def distill(teacher: str, epochs: str) -> list[str]:
        return ["distill", "{runs}/" + teacher, *common, "--epochs", epochs]

    return [
        Row("parent", "parent", nominal_parent_epochs=0.0, notes="s0 as trained (15 epochs)"),
        Row(
            "deep4",
            "deep ensemble (4)",
            ["ensemble", *parents, "--out", "{out}", "--overwrite"],
            nominal_parent_epochs=4 * PARENT_EPOCHS_OF_PARENT,
            notes="s0..s3, probability mean; cost = 4 x 15 epochs",
        ),
        Row(
            "tscale",
            "temperature scaling (posthoc calibrate)",
            ["calibrate", p0, *common[:-1]],
            notes="peer: one temperature fitted on the select part",
        ),
        Row("swa", "SWA 1 epoch (torch swa_utils)", peer="swa", notes="peer: 10 snapshots of one epoch at lr 0.01, update_bn"),
        Row(
            "laplace",
            "last-layer Laplace (laplace-torch)",
            peer="laplace",
            notes="peer: KFAC, prior precision by marginal likelihood, probit predictive",
        ),
        Row("noisy", "noisy", boost("noisy"), notes="defaults"),
        Row("noisy-b15", "noisy --inference-budget 1.5", boost("noisy", "--inference-budget", "1.5")),
        Row("resample", "resample", boost("resample"), notes="defaults: the mean model"),
        Row("resample-k8", "resample --members 8", boost("resample", "--members", "8"), notes="8 Gaussian draws"),
        Row("resample-b1", "resample --inference-budget 1.0", boost("resample", "--inference-budget", "1.0")),
        Row("lastlayer", "lastlayer", boost("lastlayer"), notes="defaults"),
        Row("supernet", "supernet (s0)", boost("supernet"), notes="4 copies of s0 with retrained last layers, coupled"),
        Row(
            "supernet4",
            "supernet (s0..s3)",
            ["boost", *parents, "--method", "supernet", *common],
            base_parent_epochs=4 * PARENT_EPOCHS_OF_PARENT,
            notes="couples the deep ensemble's four parents; cost includes their 4 x 15 training epochs",
        ),
        Row("sparse", "sparse", boost("sparse"), notes="defaults"),
        Row("sparse-s1", "sparse --seed 1", boost("sparse", "--seed", "1"), notes="defaults, second seed"),
        Row(
            "sparse-pruned",
            "sparse --keep 0.5",
            boost("sparse", "--keep", "0.5"),
            notes="partitioned halves, the thesis's recipe",
        ),
        Row(
            "sparse-anneal",
            "sparse --keep 0.5 --anneal temperature --anneal-epochs 1",
            boost("sparse", "--keep", "0.5", "--anneal", "temperature", "--anneal-epochs", "1"),
        ),
        Row("sparse-couple", "sparse --couple --members 2", boost("sparse", "--couple", "--no-include-parent", "--members", "2")),
        Row(
            "distill-deep4-1",
            "distill deep ensemble (4), 1 epoch",
            distill("deep4", "1"),
            teacher="deep4",
            notes="student s0; the cost is the distillation's (the teacher's 4 x 15 training epochs are not included)",
        ),
        Row(
            "distill-deep4-2",
            "distill deep ensemble (4), 2 epochs",
            distill("deep4", "2"),
            teacher="deep4",
            notes="student s0; the cost is the distillation's (the teacher's 4 x 15 training epochs are not included)",
        ),
        Row(
            "distill-sparse-1",
            "distill sparse, 1 epoch",
            distill("sparse", "1"),
            teacher="sparse",
            notes="student s0; the cost is the distillation's (building the sparse teacher is the sparse row)",
        ),
        Row(
            "distill-sparse-2",
            "distill sparse, 2 epochs",
            distill("sparse", "2"),
            teacher="sparse",
            notes="student s0; the cost is the distillation's (building the sparse teacher is the sparse row)",
        ),
    ]


# ------------------------------------------------------------------------------------------ data
def prepare_data(shared: Path, cache: Path) -> Path:
    """Unpack ``cifar10-trainval.tar.gz`` once into ``cache`` and check the protocol's counts."""
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
        raise SystemExit(f"unexpected CIFAR-10 layout {counts}, benchmarks/PROTOCOL.md expects {expected}")
    return root


# ----------------------------------------------------------------------------------- measurements
def parent_epoch_seconds(parent: str, data: Path, steps: int = 100) -> float:
    """Wall time of one training epoch of the parent over train/ (batch 128, SGD), as benchmarks/PROTOCOL.md says:
    the first ``steps`` batches after two warm-up steps, timed and scaled to the epoch's length."""
    from posthoc import load_model
    from posthoc.data import make_loader, open_split, resolve_data_config, train_transform
    from posthoc.training import sgd_with_schedule, train_steps

    model = load_model(parent)
    loader = make_loader(
        open_split(data, "train", train_transform(resolve_data_config(model))), 128, shuffle=True, drop_last=True
    )
    opt, _ = sgd_with_schedule(list(model.parameters()), steps, schedule="constant", max_lr=0.01, weight_decay=5e-4)
    model.train()
    batches = iter(loader)
    train_steps(model, itertools.islice(batches, 2), opt, steps=2)  # warm-up: allocator, loader worker
    start = time.perf_counter()
    train_steps(model, itertools.islice(batches, steps), opt, steps=steps)
    return (time.perf_counter() - start) * len(loader) / steps


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
        "FLOPs (x parent) | inference time (x parent) |"
    )
    lines = [head, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in records:
        m = r["metrics"]
        mb = f"{r['artifact_mb']:.1f}" if r.get("artifact_mb") is not None else "-"
        flops = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") is not None else "-"
        lines.append(
            f"| {r['name']} | {m['top1']:.2f} | {m['nll']:.4f} | {m['ece']:.2f} | {m['brier']:.4f} | {r['members']} | "
            f"{r['params_m']:.1f} | {mb} | {r['wall_seconds']:.0f} | {r['parent_epochs']:.2f} | {flops} | {r['time_ratio']:.2f} |"
        )
    table = "\n".join(lines)
    first = records[0] if records else {}
    kept = [r for r in records if r.get("kept_share")]
    shares = "".join(
        f"\n- {r['name']}: keeps {100 * r['kept_share']['top1']:.0f}% of its teacher's top-1 gain over the parent and "
        f"{100 * r['kept_share']['nll']:.0f}% of its NLL gain."
        for r in kept
    )
    text = (
        "# CIFAR-10, ResNet-18 parents (protocol: benchmarks/PROTOCOL.md)\n\n"
        "Metrics on the 3,000-image **report** part of `val/`; everything was tuned on the 2,000-image select part.\n"
        "Cost: the method's wall time, and that time over one parent training epoch measured in the same run "
        "(deep ensemble: 4 x 15 training epochs, by the protocol). FLOPs: forward FLOPs per image over the parent's. "
        "Inference time: forward time at batch 256 on this CPU over the parent's, measured alternately in the same run.\n\n"
        f"{table}\n\n"
        + (f"Distillation:{shares}\n\n" if kept else "")
        + f"Machine: {first.get('machine', '?')}; torch {first.get('torch', '?')}, timm {first.get('timm', '?')}; "
        f"one parent epoch = {first.get('parent_epoch_seconds', float('nan')):.1f} s in the run that produced each row "
        "(per-row values in the JSON).\n"
    )
    path.write_text(text)
    return table


def plot_pareto(records: list[dict], path: Path) -> None:
    """Gain over the parent (NLL down, top-1 up) against inference time, one point per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    parent = next((r for r in records if r["key"] == "parent"), None)
    if parent is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.8))
    for ax, key, sign, label in (
        (axes[0], "nll", -1, "NLL decrease vs parent"),
        (axes[1], "top1", 1, "top-1 gain vs parent (points)"),
    ):
        for r in records:
            if r["key"] == "parent":
                continue
            gain = sign * (r["metrics"][key] - parent["metrics"][key])
            ax.scatter(r["time_ratio"], gain, s=18)
            ax.annotate(r["name"], (r["time_ratio"], gain), fontsize=6, xytext=(3, 2), textcoords="offset points")
        ax.axhline(0, color="0.6", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("inference time (x parent, CPU, batch 256)")
        ax.set_ylabel(label)
    fig.suptitle("CIFAR-10 report split: gain against inference cost (the deep ensemble costs 60 parent-epochs to train)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


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

    import peers
    import timm

    import posthoc
    from posthoc import load, load_model
    from posthoc.cost import flops_ratio, time_ratio
    from posthoc.paths import size_mb

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
    parent_result = {"param_count": round(sum(p.numel() for p in parent_model.parameters()) / 1e6, 2)}

    results_file = args.out / "cifar10_resnet18.json"
    previous = {r["key"]: r for r in json.loads(results_file.read_text())} if results_file.exists() else {}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
    for row in wanted:
        print(f"row {row.name} ...", flush=True)
        art = work / row.key
        cmd, result = None, None
        if row.peer == "laplace":
            fit = peers.laplace(parents[0], data)
            wall, target, ratio = fit["seconds"], None, fit["time_ratio"]
            result = {**fit["metrics"], "reliability": fit["reliability"], "param_count": parent_result["param_count"]}
            cmd = f"laplace-torch on {parents[0]} (benchmarks/peers.py)"
        elif row.peer == "swa":
            wall, target = peers.swa(parents[0], data, art), str(art)
            cmd = f"torch.optim.swa_utils on {parents[0]} (benchmarks/peers.py)"
        elif row.build is None:
            target, wall = parents[0], 0.0
        else:
            argv = [a.format(data=data, out=art, runs=work) for a in row.build]
            wall = run(argv, work / f"{row.key}.build.log")
            target, cmd = str(art), "posthoc " + shlex.join(argv)
        if result is None:
            result_json = work / f"{row.key}.eval.json"
            run(
                [
                    "eval",
                    target,
                    "--data",
                    str(data),
                    "--split",
                    "val:report",
                    "--results-file",
                    str(result_json),
                    "--no-progress",
                ],
                work / f"{row.key}.eval.log",
            )
            result = json.loads(result_json.read_text())
            module = load(art) if row.build is not None else (load_model(target) if target != parents[0] else None)
            ratio = time_ratio(module, parent_model, batch=256) if module is not None else 1.0
        if row.key == "parent":
            parent_result = result
        is_artifact = row.build is not None and row.peer is None
        cost = row.nominal_parent_epochs if row.nominal_parent_epochs is not None else row.base_parent_epochs + wall / epoch_s
        previous[row.key] = {
            "key": row.key,
            "name": row.name,
            "command": cmd or f"posthoc eval {parents[0]} (no build)",
            "notes": row.notes,
            "package": fit["package"]
            if row.peer == "laplace"
            else (peers.swa_package() if row.peer == "swa" else f"posthoc {posthoc.__version__}"),
            "metrics": {k: result[k] for k in ("top1", "top5", "nll", "ece", "brier") if k in result},
            "member_top1": result.get("member_top1"),
            "disagreement": result.get("disagreement"),
            "members": result.get("members", 1),
            "params_m": result["param_count"],
            "artifact_mb": size_mb(art)
            if is_artifact or row.peer == "swa"
            else (size_mb(parents[0]) if row.build is None and row.peer is None else None),
            "wall_seconds": round(wall, 1),
            "parent_epoch_seconds": round(epoch_s, 2),
            "parent_epochs": round(cost, 3),
            "flops_ratio": round(flops_ratio(load(art), parent_model), 3)
            if is_artifact
            else (1.0 if row.peer != "laplace" else None),
            "time_ratio": round(ratio, 3),
            "temperature": (
                json.loads((art / "config.json").read_text())["method"]["measured"].get("temperature") if is_artifact else None
            ),
            "reliability": result["reliability"],
            "torch": torch.__version__,
            "timm": timm.__version__,
            "machine": machine,
        }
        if row.teacher and row.teacher in previous and "parent" in previous:
            t, p, s_ = previous[row.teacher]["metrics"], previous["parent"]["metrics"], previous[row.key]["metrics"]
            previous[row.key]["kept_share"] = {
                "top1": round((s_["top1"] - p["top1"]) / (t["top1"] - p["top1"]), 3) if t["top1"] != p["top1"] else None,
                "nll": round((p["nll"] - s_["nll"]) / (p["nll"] - t["nll"]), 3) if t["nll"] != p["nll"] else None,
            }
        m = previous[row.key]["metrics"]
        print(
            f"  top-1 {m['top1']:.2f}  NLL {m['nll']:.4f}  ECE {m['ece']:.2f}  cost {cost:.2f} parent-epochs  "
            f"inference time x{ratio:.2f}",
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
            if (row.build is not None or row.peer) and row.nominal_parent_epochs is None:
                rec["parent_epochs"] = round(row.base_parent_epochs + rec["wall_seconds"] / mean_s, 3)
        results_file.write_text(json.dumps(list(_ordered(previous, all_rows)), indent=1) + "\n")
    records = list(_ordered(previous, all_rows))
    table = write_table(records, args.out / "cifar10_resnet18.md")
    plot_reliability(records, args.out / "cifar10_reliability.png")
    plot_pareto(records, args.out / "cifar10_pareto.png")
    update_readme(table)
    print(table)


def _ordered(records: dict, all_rows: list[Row]):
    keys = [r.key for r in all_rows]
    return (records[k] for k in keys if k in records)  # rows no longer defined are dropped


if __name__ == "__main__":
    main()
