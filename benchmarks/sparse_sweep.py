"""How the ``sparse`` defaults are chosen on a converged parent, on the select part only.

    python benchmarks/sparse_sweep.py [--parent ../shared/parents/resnet18_cifar10_35ep_s0] [--rows a,b] [--seeds 0,1]

Every configuration is an ordinary ``boost --method sparse`` run that tunes (BatchNorm checks, test-time
views, temperature) on the first 1,000 images of ``val:select`` and is scored on the other 1,000
(``select_half.py``); the report part is never read. Each row is scored twice: as built (views chosen by
``--tta auto`` on the tuning half) and with the image alone (the same members, views ``none``, the
temperature decided again on the tuning half), so what views add and what members add are told apart.
The reference rows are the parent, the parent with the mirrored view, and the parent trained longer.

Rows are grouped by training budget in parent-epochs (children x epochs per child): 1, 2, 4 and 6. Rows
already in the results file are kept (``--redo`` runs them again), so an interrupted sweep resumes.
Results: ``sparse_sweep_35ep.json`` and ``sparse_sweep_35ep.md`` in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
ONE = {"members": 1, "include_parent": False}  # one network: the parent trained longer
# key: (budget in parent-epochs, description, options)
GRID: dict[str, tuple[float, str, dict]] = {
    "longer-1": (1, "train longer 1 epoch (1 network)", {**ONE, "child_epochs": 1.0}),
    "longer-2": (2, "train longer 2 epochs (1 network)", {**ONE, "child_epochs": 2.0}),
    "longer-2-lr02": (2, "train longer 2 epochs at max-lr 0.02 (1 network)", {**ONE, "child_epochs": 2.0, "max_lr": 0.02}),
    "longer-4": (4, "train longer 4 epochs (1 network)", {**ONE, "child_epochs": 4.0}),
    "p1x2": (2, "parent + 1 child x 2 epochs", {"members": 2, "child_epochs": 2.0}),
    "p1x4": (4, "parent + 1 child x 4 epochs", {"members": 2, "child_epochs": 4.0}),
    "2x2": (4, "2 children x 2 epochs", {"members": 2, "include_parent": False, "child_epochs": 2.0}),
    "p2x2": (4, "parent + 2 children x 2 epochs", {"members": 3, "child_epochs": 2.0}),
    "p2x2-lr10": (
        4,
        "parent + 2 children x 2 epochs at max-lr 0.1 (a rate that leaves the basin)",
        {"members": 3, "child_epochs": 2.0, "max_lr": 0.1},
    ),
    "p3x2": (6, "parent + 3 children x 2 epochs", {"members": 4, "child_epochs": 2.0}),
    "p2x3": (6, "parent + 2 children x 3 epochs", {"members": 3, "child_epochs": 3.0}),
    # phase 2: children that keep the parent's accuracy (a lower rate) and children made different on purpose
    "p1x2-lr02": (2, "parent + 1 child x 2 epochs at max-lr 0.02", {"members": 2, "child_epochs": 2.0, "max_lr": 0.02}),
    "p1x4-lr02": (4, "parent + 1 child x 4 epochs at max-lr 0.02", {"members": 2, "child_epochs": 4.0, "max_lr": 0.02}),
    "p2x2-lr02": (4, "parent + 2 children x 2 epochs at max-lr 0.02", {"members": 3, "child_epochs": 2.0, "max_lr": 0.02}),
    "p2x2-hyper": (
        4,
        "parent + 2 children x 2 epochs, hyper-parameter diversity",
        {"members": 3, "child_epochs": 2.0, "child_diversity": "hyper"},
    ),
    "p2x2-cw": (
        4,
        "parent + 2 children x 2 epochs, random class weights",
        {"members": 3, "child_epochs": 2.0, "child_diversity": "classweights"},
    ),
    "p2x2-lr02-cw": (
        4,
        "parent + 2 children x 2 epochs at max-lr 0.02, random class weights",
        {"members": 3, "child_epochs": 2.0, "max_lr": 0.02, "child_diversity": "classweights"},
    ),
    "p1x2-cw": (
        2,
        "parent + 1 child x 2 epochs, random class weights",
        {"members": 2, "child_epochs": 2.0, "child_diversity": "classweights"},
    ),
    "traj-p2x2": (4, "parent + trajectory of 2 cycles x 2 epochs", {"members": 3, "child_epochs": 2.0, "schedule": "trajectory"}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_35ep_s0"))
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".cache" / "cifar10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="sparse_sweep_35ep", help="results file stem")
    ap.add_argument("--rows", default="all", help="comma-separated keys of the grid, or all")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--redo", action="store_true", help="run rows again that the results file already holds")
    args = ap.parse_args()

    from select_half import scoring_half

    import posthoc
    from posthoc.artifact import read
    from posthoc.calibration import finish, with_views
    from posthoc.commands.boost import boost
    from posthoc.data import eval_transform, make_loader, open_split, resolve_data_config
    from posthoc.evaluate import evaluate, headline
    from posthoc.fused import EnsembleModule

    parent, loader, base = scoring_half(args.parent, args.data)
    flip = evaluate(with_views(parent, ("identity", "hflip")), loader, show_progress=False)
    tuning = make_loader(open_split(args.data, "val:select", eval_transform(resolve_data_config(parent)), select_size=1000), 250)
    results_file = args.out / f"{args.name}.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    runs = {(r["key"], r["seed"]): r for r in saved.get("runs", [])}
    keys = list(GRID) if args.rows == "all" else args.rows.split(",")
    for key in keys:
        budget, name, config = GRID[key]
        for seed in map(int, args.seeds.split(",")):
            if (key, seed) in runs and not args.redo:
                continue
            with tempfile.TemporaryDirectory() as tmp:
                start = time.perf_counter()
                summary = boost(
                    [args.parent],
                    "sparse",
                    args.data,
                    Path(tmp) / "a",
                    select_size=1000,
                    overwrite=True,
                    progress=False,
                    log=lambda m: None,
                    seed=seed,
                    **config,
                )
                seconds = time.perf_counter() - start
                built = evaluate(posthoc.load(Path(tmp) / "a"), loader, show_progress=False)
                ensemble, _ = read(Path(tmp) / "a")
                plain, _ = finish(ensemble, tuning, torch.device("cpu"), tta="none")  # same members, the image alone
                alone = evaluate(EnsembleModule(plain.as_float32()), loader, show_progress=False)
            notes = summary["notes"]
            runs[(key, seed)] = {
                "key": key,
                "name": name,
                "budget_parent_epochs": budget,
                "seed": seed,
                "config": config,
                "seconds": round(seconds, 1),
                "views": notes["views"]["chosen"]["views"],
                "flops_ratio": summary["cost"]["flops_ratio"],
                "auto": headline(built),
                "none": headline(alone),
                "children_select_top1": [c["select"]["top1"] for c in notes["children"].values()],
                "temperature": (notes.get("temperature") or {}).get("temperature"),
            }
            print(json.dumps(runs[(key, seed)]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            payload = {
                "parent_spec": args.parent,
                "parent": headline(base),
                "parent_flip": headline(flip),
                "runs": list(runs.values()),
            }
            results_file.write_text(json.dumps(payload, indent=1) + "\n")
    write_table(args, base, flip, runs)


def write_table(args, base: dict, flip: dict, runs: dict) -> None:
    """The markdown table: every row with and without views, sorted by budget."""
    lines = [
        "| budget (parent-epochs) | configuration | seed | views chosen | top-1 | NLL | top-1 (image alone) | NLL (image alone) | "
        "member top-1 | disagreement (%) | FLOPs (x parent) |",
        "|---:|---|---:|---|---:|---:|---:|---:|---:|---:|---:|",
        f"| 0 | parent | | identity | {base['top1']:.2f} | {base['nll']:.4f} | | | | | 1.00 |",
        f"| 0 | parent + flip | | identity + hflip | {flip['top1']:.2f} | {flip['nll']:.4f} | | | | | 2.00 |",
    ]
    for r in sorted(runs.values(), key=lambda r: (r["budget_parent_epochs"], r["key"], r["seed"])):
        a, n = r["auto"], r["none"]
        lines.append(
            f"| {r['budget_parent_epochs']:g} | {r['name']} | {r['seed']} | {' + '.join(r['views'])} | {a['top1']:.2f} | "
            f"{a['nll']:.4f} | {n['top1']:.2f} | {n['nll']:.4f} | {a.get('member_top1') or n['top1']:.2f} | "
            f"{a.get('disagreement') or 0:.2f} | {r['flops_ratio']:.2f} |"
        )
    text = (
        f"# sparse on a converged parent: sweep on the select part\n\n"
        f"Parent `{Path(args.parent).name}`. Every row tunes on the first 1,000 images of `val:select` (views, "
        "temperature, BatchNorm checks) and is scored on the other 1,000; the report part was never read. "
        '"image alone": the same members with views `none` (temperature decided again on the tuning half). '
        "Budget: children x epochs per child. About +-0.5 top-1 and +-0.01 NLL is noise on 1,000 images.\n\n"
        + "\n".join(lines)
        + "\n"
    )
    (args.out / f"{args.name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
