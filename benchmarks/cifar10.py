"""CIFAR-10 / ResNet-18 benchmark v2 (benchmarks/PROTOCOL.md): converged parents, the peers every user
tries first, and a verdict per row.

    python benchmarks/cifar10.py                      # both settings, every row (prints the expected time first)
    python benchmarks/cifar10.py --setting 35ep --rows 'sparse*,flip@s0'   # some rows (shell-style patterns)

Two settings: ``35ep``, the main one (the parents trained 35 epochs, close to converged for their recipe),
and ``15ep`` (the same parents after 15 epochs, under-trained: part of any training method's gain there is
plain extra training). Every row is an ordinary ``posthoc`` command line (run as a subprocess and timed),
scored with ``posthoc eval ART --split val:report`` (posthoc's ``val:select`` / ``val:report`` parts are
the protocol's split). Methods start from parent s0 and their default rows also from s1. Peers:
``parent + flip`` (``posthoc eval --tta flip``), temperature scaling (``posthoc calibrate --tta none``),
``posthoc calibrate --tta auto`` (views and temperature, no training), ``train longer`` (the parent
fine-tuned as one network with the shared engine's one-cycle schedule: ``boost --method sparse --members 1
--no-include-parent --child-epochs N --tta none``) with and without the mirror, the deep ensemble of the
four parents with and without it, SWA and last-layer Laplace (``peers.py``). Every method's default row is
run with ``--tta auto`` (the default) and ``--tta none``.

Costs: each row's training wall time over one parent training epoch measured in the same run (at its start
and at its end, the mean used): "parent-epochs"; a row that only evaluates another row's artifact with
the mirror carries that row's cost; the deep ensemble costs its parents' epochs by the protocol. FLOPs are
counted per image against the parent (views and members as they run); time ratios are measured against the
parent in this process. The verdict (``verdict.py``) names, per parent, the row that dominates each row
(no more parent-epochs, no more FLOPs, top-1 at least as high, NLL at least as low, better in one), or
"front".

The run is resumable: rows already in a setting's JSON are kept (``--redo`` runs them again), and
artifacts are kept under ``--cache`` for the rows that evaluate them. Results per setting:
``cifar10_resnet18[_15ep].json`` (one record per row, with the exact command and the versions),
``cifar10_resnet18[_15ep].md`` (the table with the verdicts), ``cifar10_pareto[_15ep].png``; the main
setting's table is copied into the README between the results markers.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import platform
import shlex
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {
    "35ep": {
        "prefix": "resnet18_cifar10_35ep_s",
        "epochs": 35,
        "suffix": "",
        "title": "converged parents (35 epochs): the main setting",
    },
    "15ep": {"prefix": "resnet18_cifar10_s", "epochs": 15, "suffix": "_15ep", "title": "under-trained parents (15 epochs)"},
}
# The sparse rows by training budget (parent-epochs): chosen on the select part of the converged parent
# s0 (benchmarks/results/sparse_sweep_35ep.md); "default" marks the configuration boost uses without options.
SPARSE = {
    2: ["--members", "2", "--child-epochs", "2"],
    4: [],  # the defaults: --members 2 --child-epochs 4
    6: ["--members", "3", "--child-epochs", "3"],
}


@dataclass
class Row:
    """One table row: a posthoc command that builds an artifact, an evaluation of one, or a peer."""

    key: str
    name: str
    parent: int | None  # index of the parent it starts from; None: all four (shared by both comparisons)
    build: list[str] | None = None  # posthoc arguments that write {out}
    of: str | None = None  # evaluate this row's artifact (default: the row's own; "parent": the checkpoint)
    tta: str | None = None  # eval --tta for the row
    peer: str | None = None  # "swa" or "laplace" (peers.py)
    nominal_parent_epochs: float | None = None  # training cost fixed by the protocol
    base_parent_epochs: float = 0.0  # training of the row's inputs, on top of its own
    estimate: float = 0.0  # expected parent-epochs of its own work (for the printed estimate)
    teacher: str | None = None  # distillation: the row whose artifact teaches
    of_cost: str | None = None  # a row whose cost this one carries (it reuses that row's trained members)
    default: bool = False  # a method's default row
    notes: str = ""


def without_views(key: str, name: str, parent: int) -> Row:
    """The row ``key``'s members with the image alone: boost's last step again with ``--tta none`` (``posthoc
    calibrate --tta none --temperature auto``, boost's temperature rule); the same seed gives ``boost --tta none``
    the same members (tests/test_views.py), so its cost is ``key``'s."""
    base, _, at = key.partition("@")
    command = ["calibrate", "{runs}/" + key, "--data", "{data}", "--out", "{out}", "--overwrite", "--tta", "none"]
    return Row(
        f"{base}-none@{at}", name, parent, [*command, "--temperature", "auto"], of_cost=key, notes=f"{key}'s members, views none"
    )


def rows(setting: str, parents: list[str]) -> list[Row]:
    """Every row of a setting; ``{data}``, ``{out}`` and ``{runs}`` are filled in at run time."""
    epochs = SETTINGS[setting]["epochs"]
    common = ["--data", "{data}", "--out", "{out}", "--overwrite", "--no-progress"]
    out: list[Row] = [
        Row(
            "deep4",
            "deep ensemble (4)",
            None,
            ["ensemble", *parents, "--out", "{out}", "--overwrite"],
            nominal_parent_epochs=4 * epochs,
            notes=f"s0..s3, probability mean; cost = 4 x {epochs} epochs",
        ),
        Row("deep4+flip", "deep ensemble (4) + flip", None, of="deep4", tta="flip"),
    ]
    for p in (0, 1):
        s, spec = f"@s{p}", parents[p]

        def boost(method: str, *flags: str, spec=spec) -> list[str]:
            return ["boost", spec, "--method", method, *common, *flags]

        out += [
            Row(f"parent{s}", "parent", p, of="parent", nominal_parent_epochs=0.0, notes=f"s{p} as trained ({epochs} epochs)"),
            Row(
                f"flip{s}",
                "parent + flip",
                p,
                of="parent",
                tta="flip",
                nominal_parent_epochs=0.0,
                notes="posthoc eval --tta flip",
            ),
            Row(
                f"tscale{s}",
                "temperature scaling",
                p,
                ["calibrate", spec, *common[:-1], "--tta", "none"],
                notes="posthoc calibrate --tta none",
            ),
            Row(
                f"calib{s}",
                "posthoc calibrate (views + temperature)",
                p,
                ["calibrate", spec, *common[:-1]],
                notes="--tta auto: no training",
            ),
        ]
        if setting != "35ep" and p == 1:
            continue  # the under-trained setting: parent s1 for the peers without training only
        for n in (1, 2, 4):
            longer = boost("sparse", "--members", "1", "--no-include-parent", "--child-epochs", str(n), "--tta", "none")
            out += [
                Row(
                    f"longer{n}{s}",
                    f"train longer {n} epoch{'s' * (n > 1)}",
                    p,
                    longer,
                    estimate=n,
                    notes="one network: the parent fine-tuned with the one-cycle schedule (max-lr 0.05)",
                ),
                Row(f"longer{n}+flip{s}", f"train longer {n} epoch{'s' * (n > 1)} + flip", p, of=f"longer{n}{s}", tta="flip"),
            ]
        if p == 0:
            out += [
                Row(
                    f"swa{s}",
                    "SWA 1 epoch (torch swa_utils)",
                    p,
                    peer="swa",
                    estimate=1.3,
                    notes="10 snapshots of one epoch at lr 0.01, update_bn",
                ),
                Row(
                    f"laplace{s}",
                    "last-layer Laplace (laplace-torch)",
                    p,
                    peer="laplace",
                    estimate=0.5,
                    notes="KFAC, prior precision by marginal likelihood, probit predictive",
                ),
            ]
        for method, estimate in (("noisy", 0.7), ("resample", 1.1), ("lastlayer", 1.2), ("supernet", 3.7)):
            out += [
                Row(f"{method}{s}", method, p, boost(method), estimate=estimate, default=True, notes="defaults (--tta auto)"),
                without_views(f"{method}{s}", f"{method} --tta none", p),
            ]
        for budget, flags in SPARSE.items() if setting == "35ep" else [(4, SPARSE[4])]:
            name = "sparse" if not flags else f"sparse {' '.join(flags)}"
            label = f"sparse{budget}"
            out += [
                Row(
                    f"{label}{s}",
                    f"{name} ({budget} parent-epochs)",
                    p,
                    boost("sparse", *flags),
                    estimate=budget,
                    default=not flags,
                    notes="defaults (--tta auto)" if not flags else "--tta auto",
                ),
                without_views(f"{label}{s}", f"{name} --tta none ({budget} parent-epochs)", p),
            ]
        out += [
            Row(
                f"distill{s}",
                "distill sparse (defaults)",
                p,
                ["distill", "{runs}/" + f"sparse4{s}", *common],
                teacher=f"sparse4{s}",
                estimate=2.0,
                notes="student: the parent; teacher: the sparse default artifact; its cost includes the teacher's",
            ),
        ]
        if p == 0 and setting == "35ep":
            out += [
                Row(
                    f"noisy-b15{s}", "noisy --inference-budget 1.5", p, boost("noisy", "--inference-budget", "1.5"), estimate=0.4
                ),
                Row(
                    f"supernet4{s}",
                    "supernet (s0..s3)",
                    None,
                    ["boost", *parents, "--method", "supernet", *common],
                    base_parent_epochs=4 * epochs,
                    estimate=1.0,
                    notes=f"couples the four parents; cost includes their 4 x {epochs} epochs",
                ),
            ]
    return out


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
    """Wall time of one training epoch of the parent over train/ (batch 128, SGD), as the protocol says:
    the first ``steps`` batches after two warm-up steps, timed and scaled to the epoch's length."""
    import itertools

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


def score(target: str, data: Path, tta: str | None, log_stem: Path) -> dict:
    """``posthoc eval TARGET --split val:report`` (with ``--tta``), its results file read back."""
    out = log_stem.with_suffix(".eval.json")
    args = ["eval", target, "--data", str(data), "--split", "val:report", "--results-file", str(out), "--no-progress"]
    run([*args, *(["--tta", tta] if tta else [])], log_stem.with_suffix(".eval.log"))
    return json.loads(out.read_text())


def module_of(target: str, tta: str | None):
    """The module ``posthoc eval`` scores for ``target`` (with ``tta``), for FLOPs and time."""
    from posthoc import load_model
    from posthoc.calibration import with_views
    from posthoc.views import views_of

    module = load_model(target)
    return with_views(module, views_of(tta)) if tta else module


# ---------------------------------------------------------------------------------------- output
def write_table(setting: str, records: list[dict], path: Path, machine: str) -> str:
    """The markdown table with the verdicts, parent s0's comparison first."""
    head = (
        "| row | parent | top-1 (%) | NLL | ECE (%) | Brier | members | views | parent-epochs | FLOPs (x parent) | "
        "time (x parent) | dominated by |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    names = {r["key"]: r["name"] for r in records}
    for r in sorted(records, key=lambda r: (r["group"], r["order"])):
        m = r["metrics"]
        flops = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") is not None else "-"
        verdict = "**front**" if r["dominated_by"] is None else names.get(r["dominated_by"], r["dominated_by"])
        lines.append(
            f"| {r['name']} | {r['parent_label']} | {m['top1']:.2f} | {m['nll']:.4f} | {m['ece']:.2f} | {m['brier']:.4f} | "
            f"{r['members']} | {r['views']} | {r['parent_epochs']:.2f} | {flops} | {r['time_ratio']:.2f} | {verdict} |"
        )
    table = "\n".join(lines)
    title = SETTINGS[setting]["title"]
    first = records[0] if records else {}
    text = (
        f"# CIFAR-10, ResNet-18: {title}\n\n"
        "Protocol: `benchmarks/PROTOCOL.md`. Metrics on the 3,000-image **report** part of `val/`; every choice was "
        "made on the 2,000-image select part. About +-0.3 top-1 is noise on 3,000 images. Parent-epochs: the row's "
        "training wall time over one parent training epoch measured in the same run (the deep ensemble: its parents' "
        "epochs). FLOPs: forward FLOPs per image over the parent's, views and members as they run. Time: forward "
        "time at batch 256 on this CPU over the parent's. *Dominated by*: a row of the same parent (or the shared "
        "deep ensemble) with no more parent-epochs, no more FLOPs, top-1 at least as high and NLL at least as low, "
        "better in one; **front** where none is.\n\n"
        f"{table}\n\n"
        f"Machine: {machine}; torch {first.get('torch', '?')}, timm {first.get('timm', '?')}; one parent epoch = "
        f"{first.get('parent_epoch_seconds', float('nan')):.1f} s in the run that produced each row (per-row values in the JSON).\n"
    )
    path.write_text(text)
    return table


def plot_pareto(setting: str, records: list[dict], path: Path) -> None:
    """Top-1 and NLL against FLOPs for each parent's comparison; the front filled, dominated rows hollow,
    colour by training cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9))
    for col, p in enumerate((0, 1)):
        mine = [r for r in records if r["parent"] in (p, None) and r.get("flops_ratio") is not None]
        for row, (key, label) in enumerate((("top1", "top-1 (%)"), ("nll", "NLL"))):
            ax = axes[row][col]
            for r in mine:
                pe = r["parent_epochs"]
                color = "tab:green" if pe < 0.1 else "tab:blue" if pe <= 1.5 else "tab:orange" if pe <= 6 else "tab:red"
                front = r["dominated_by"] is None
                ax.scatter(r["flops_ratio"], r["metrics"][key], s=36, color=color, facecolors=color if front else "none")
                if front:
                    ax.annotate(
                        r["name"], (r["flops_ratio"], r["metrics"][key]), fontsize=6, xytext=(3, 2), textcoords="offset points"
                    )
            ax.set_xscale("log")
            ax.set_xlabel("inference FLOPs (x parent)")
            ax.set_ylabel(label)
            ax.set_title(f"parent s{p}: filled = front (labelled), hollow = dominated", fontsize=9)
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=c, label=t)
        for c, t in (
            ("tab:green", "no training"),
            ("tab:blue", "<= 1.5 parent-epochs"),
            ("tab:orange", "<= 6"),
            ("tab:red", "> 6"),
        )
    ]
    fig.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, 0.965), ncol=4, fontsize=8)
    fig.suptitle(f"CIFAR-10 report part, {SETTINGS[setting]['title']}", y=0.995)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=120)


def update_readme(table: str) -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    start, end = "<!-- results:start -->", "<!-- results:end -->"
    if start in text and end in text:
        before, rest = text.split(start, 1)
        _, after = rest.split(end, 1)
        readme.write_text(f"{before}{start}\n{table}\n{end}{after}")


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    ap.add_argument("--setting", default="35ep,15ep", help="comma-separated settings: 35ep (main), 15ep")
    ap.add_argument("--rows", default="*", help="comma-separated row keys or shell-style patterns (default: all)")
    ap.add_argument("--redo", action="store_true", help="run rows again that the results already hold")
    ap.add_argument("--dry-run", action="store_true", help="print the rows to run and the expected time, run nothing")
    ap.add_argument("--tables-only", action="store_true", help="write the tables, plot and verdicts from the JSON, run nothing")
    args = ap.parse_args()

    data = prepare_data(args.shared, args.cache)
    for setting in args.setting.split(","):
        run_setting(setting, args, data)


def run_setting(setting: str, args, data: Path) -> None:
    import peers
    import timm
    from verdict import verdicts

    import posthoc
    from posthoc import load_model
    from posthoc.cost import flops_ratio, time_ratio
    from posthoc.paths import size_mb

    spec = SETTINGS[setting]
    parents = [str(args.shared / "parents" / f"{spec['prefix']}{i}") for i in range(4)]
    all_rows = rows(setting, parents)
    patterns = args.rows.split(",")
    results_file = args.out / f"cifar10_resnet18{spec['suffix']}.json"
    previous = {r["key"]: r for r in json.loads(results_file.read_text())} if results_file.exists() else {}
    wanted = [r for r in all_rows if any(fnmatch.fnmatch(r.key, p) for p in patterns) and (args.redo or r.key not in previous)]
    if args.tables_only:
        wanted = []
    work = args.cache / "runs" / setting
    work.mkdir(parents=True, exist_ok=True)
    known = [r["parent_epoch_seconds"] for r in previous.values()]
    if args.tables_only:
        epoch_s = known[-1] if known else 0.0
    else:
        epoch_s = known[-1] if args.dry_run and known else (80.0 if args.dry_run else parent_epoch_seconds(parents[0], data))
    expected = sum(r.estimate for r in wanted)
    print(
        f"[{setting}] {len(wanted)} rows to run ({len(previous)} kept): about {expected:.0f} parent-epochs of training "
        f"x {epoch_s:.0f} s = {expected * epoch_s / 3600:.1f} h, plus about {len(wanted) * 0.5:.0f} min of evaluation",
        flush=True,
    )
    if args.dry_run:
        for r in wanted:
            print(f"  {r.key}: {r.name}")
        return
    parent_models = {p: load_model(parents[p]) for p in (0, 1)}
    machine = f"{platform.machine()}, {os.cpu_count()} CPU cores, {torch.get_num_threads()} torch threads"
    by_key = {r.key: r for r in all_rows}
    for row in wanted:
        print(f"row {row.key}: {row.name} ...", flush=True)
        art = work / row.key
        p = row.parent if row.parent is not None else 0
        parent_model = parent_models[p]
        command, wall, module, result = None, 0.0, None, None
        if row.peer == "laplace":
            fit = peers.laplace(parents[p], data)
            wall, result = fit["seconds"], {**fit["metrics"], "reliability": fit["reliability"], "members": 1}
            ratio, flops = fit["time_ratio"], fit["flops_ratio"]
            command = f"laplace-torch on {parents[p]} (benchmarks/peers.py)"
        else:
            if row.peer == "swa":
                wall = peers.swa(parents[p], data, art)
                target, command = str(art), f"torch.optim.swa_utils on {parents[p]} (benchmarks/peers.py)"
            elif row.build is not None:
                argv = [a.format(data=data, out=art, runs=work) for a in row.build]
                wall = run(argv, work / f"{row.key}.build.log")
                target, command = str(art), "posthoc " + shlex.join(argv)
            else:
                target = parents[p] if row.of == "parent" else str(work / row.of)
                if not Path(target).exists():
                    raise SystemExit(f"row {row.key} evaluates {row.of}, which has no artifact in {work}; run that row first")
                command = f"posthoc eval {target}" + (f" --tta {row.tta}" if row.tta else "")
            result = score(target, data, row.tta, work / row.key)
            module = module_of(target, row.tta)
            ratio = time_ratio(module, parent_model, batch=256)
            flops = flops_ratio(module, parent_model)
        source = by_key.get(row.of) if row.of not in (None, "parent") else None
        previous[row.key] = {
            "key": row.key,
            "name": row.name,
            "parent": row.parent,
            "parent_label": f"s{row.parent}" if row.parent is not None else "s0..s3",
            "command": command,
            "notes": row.notes,
            "package": fit["package"]
            if row.peer == "laplace"
            else (peers.swa_package() if row.peer == "swa" else f"posthoc {posthoc.__version__}"),
            "metrics": {k: result[k] for k in ("top1", "top5", "nll", "ece", "brier") if k in result},
            "member_top1": result.get("member_top1"),
            "disagreement": result.get("disagreement"),
            "members": result.get("members", 1),
            "views": len(getattr(module, "views", ("identity",))) if module is not None else 1,
            "params_m": result.get("param_count"),
            "artifact_mb": size_mb(art) if art.exists() else None,
            "wall_seconds": round(wall, 1),
            "own_parent_epochs": row.nominal_parent_epochs if row.nominal_parent_epochs is not None else None,
            "base_parent_epochs": row.base_parent_epochs,
            "cost_from": row.of if source is not None else (row.teacher or row.of_cost),
            "parent_epoch_seconds": round(epoch_s, 2),
            "flops_ratio": round(flops, 4) if flops is not None else None,
            "time_ratio": round(ratio, 3),
            "reliability": result.get("reliability"),
            "torch": torch.__version__,
            "timm": timm.__version__,
            "machine": machine,
        }
        finish_costs(previous, all_rows, epoch_s)
        results_file.write_text(json.dumps(ordered(previous, all_rows), indent=1) + "\n")
        m = previous[row.key]["metrics"]
        print(
            f"  top-1 {m['top1']:.2f}  NLL {m['nll']:.4f}  {previous[row.key]['parent_epochs']:.2f} parent-epochs  FLOPs x{flops or 0:.2f}",
            flush=True,
        )
    if wanted:
        second = parent_epoch_seconds(parents[0], data)
        mean_s = (epoch_s + second) / 2
        print(f"one parent epoch: {epoch_s:.1f} s at the start, {second:.1f} s at the end; costs use the mean", flush=True)
        for row in wanted:
            previous[row.key]["parent_epoch_seconds"] = round(mean_s, 2)
            previous[row.key]["parent_epoch_seconds_start_end"] = [round(epoch_s, 2), round(second, 2)]
        finish_costs(previous, all_rows, None)
    records = ordered(previous, all_rows)
    for p in (0, 1):
        group = [r for r in records if r["parent"] in (p, None)]
        for key, beaten_by in verdicts(group).items():
            if previous[key]["parent"] == p or (previous[key]["parent"] is None and p == 0):
                previous[key]["dominated_by"] = beaten_by
    for order, r in enumerate(records):
        r["order"], r["group"] = order, {0: 0, None: 0, 1: 1}[r["parent"]]
    results_file.write_text(json.dumps(records, indent=1) + "\n")
    machine = records[0]["machine"] if records else ""
    table = write_table(setting, records, args.out / f"cifar10_resnet18{spec['suffix']}.md", machine)
    plot_pareto(setting, records, args.out / f"cifar10_pareto{spec['suffix']}.png")
    if setting == "35ep":
        update_readme(readme_table(records))
    print(table)


def finish_costs(previous: dict, all_rows: list[Row], epoch_s: float | None) -> None:
    """Every record's parent-epochs: its own wall time over the parent epoch (or the protocol's figure), plus its
    inputs', plus the row it evaluates or learns from."""
    for rec in previous.values():
        seconds = epoch_s or rec["parent_epoch_seconds"]
        own = rec["own_parent_epochs"] if rec["own_parent_epochs"] is not None else rec["wall_seconds"] / seconds
        rec["_own"] = rec["base_parent_epochs"] + own
    for rec in previous.values():
        total, seen, source = rec["_own"], {rec["key"]}, rec.get("cost_from")
        while source in previous and source not in seen:
            total += previous[source]["_own"]
            seen.add(source)
            source = previous[source].get("cost_from")
        rec["parent_epochs"] = round(total, 3)
    for rec in previous.values():
        rec.pop("_own", None)


def readme_table(records: list[dict]) -> str:
    """The README's table: parent s0's comparison (and the shared rows), the verdict column first."""
    names = {r["key"]: r["name"] for r in records}
    lines = ["| row | top-1 (%) | NLL | parent-epochs | FLOPs (x parent) | dominated by |", "|---|---:|---:|---:|---:|---|"]
    for r in records:
        if r["parent"] not in (0, None):
            continue
        verdict = "**front**" if r.get("dominated_by") is None else names.get(r["dominated_by"], "?")
        flops = f"{r['flops_ratio']:.2f}" if r.get("flops_ratio") is not None else "-"
        lines.append(
            f"| {r['name']} | {r['metrics']['top1']:.2f} | {r['metrics']['nll']:.4f} | {r['parent_epochs']:.2f} | {flops} | {verdict} |"
        )
    return "\n".join(lines)


def ordered(records: dict, all_rows: list[Row]) -> list[dict]:
    keys = [r.key for r in all_rows]
    return [records[k] for k in keys if k in records]  # rows no longer defined are dropped


if __name__ == "__main__":
    main()
