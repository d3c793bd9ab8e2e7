"""How the ``sparse`` defaults were chosen, on the select part only.

    python benchmarks/sparse_sweep.py --data benchmarks/.cache/cifar10 --out benchmarks/results

As ``noisy_sweep.py``: the method tunes on the first 1,000 images of ``val:select`` (``select_size=1000``:
temperature and BatchNorm checks) and the ensemble is scored on the other 1,000; the report part is
never read. Every configuration costs about 4 parent-epochs (children x epochs per child), inside the
issue's budget of 5. The grid follows what a first exploration on the select part suggested (epochs per
child mattered most, pruning and high rates hurt): dense children of 2 x 2 epochs vs 4 x 1, partitioned
halves (keep 0.5) with and without stochastic annealing, bootstrap-resampled dense children (more
diversity for the same epochs), and a second seed of the leading rows.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = [
    ("dense, 2 children x 2 epochs + parent", {"keep": 1.0, "members": 3, "include_parent": True, "child_epochs": 2.0}, 0),
    ("dense, 2 children x 2 epochs + parent", {"keep": 1.0, "members": 3, "include_parent": True, "child_epochs": 2.0}, 1),
    ("dense, 4 children x 1 epoch", {"keep": 1.0, "members": 4, "child_epochs": 1.0}, 0),
    ("keep 0.5 pair, 2 x 2 epochs + parent", {"keep": 0.5, "members": 3, "include_parent": True, "child_epochs": 2.0}, 0),
    (
        "keep 0.5 pair annealed (tau0 0.5 over 1 epoch), 2 x 2 epochs + parent",
        {"keep": 0.5, "members": 3, "include_parent": True, "child_epochs": 2.0, "anneal": "temperature", "anneal_epochs": 1.0},
        0,
    ),
    (
        "dense, 2 x 2 epochs + parent, bootstrap (each child its own resample of the training images)",
        {"keep": 1.0, "members": 3, "include_parent": True, "child_epochs": 2.0, "bootstrap": True},
        0,
    ),
    (
        "dense, 2 x 2 epochs + parent, bootstrap (each child its own resample of the training images)",
        {"keep": 1.0, "members": 3, "include_parent": True, "child_epochs": 2.0, "bootstrap": True},
        1,
    ),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_s0"))
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".cache" / "cifar10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--rows", default="all", help="comma-separated row indices of the grid, or all")
    args = ap.parse_args()

    from select_half import scoring_half

    from posthoc import load
    from posthoc.commands.boost import boost
    from posthoc.evaluate import evaluate

    _, loader, base = scoring_half(args.parent, args.data)
    print(f"parent on the scoring half: top-1 {base['top1']:.2f} NLL {base['nll']:.4f}", flush=True)
    results_file = args.out / "sparse_sweep.json"
    previous = json.loads(results_file.read_text())["runs"] if results_file.exists() else []
    wanted = range(len(GRID)) if args.rows == "all" else map(int, args.rows.split(","))
    runs = {(r["name"], r["seed"]): r for r in previous}
    with tempfile.TemporaryDirectory() as tmp:
        for i in wanted:
            name, config, seed = GRID[i]
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
            r = evaluate(load(Path(tmp) / "a"), loader, show_progress=False)
            children = summary["notes"]["children"]
            runs[(name, seed)] = {
                "name": name,
                "seed": seed,
                "config": config,
                "seconds": round(seconds, 1),
                "top1": r["top1"],
                "nll": r["nll"],
                "ece": r["ece"],
                "member_top1": r.get("member_top1"),
                "disagreement": r.get("disagreement"),
                "children_select_top1": [c["select"]["top1"] for c in children.values()],
                "temperature": summary["notes"].get("temperature", {}).get("temperature"),
            }
            print(json.dumps(runs[(name, seed)]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            results_file.write_text(
                json.dumps({"parent": {"top1": base["top1"], "nll": base["nll"]}, "runs": list(runs.values())}, indent=1)
            )
    lines = [
        "| configuration | seed | top-1 | NLL | ECE | mean member top-1 | disagreement (%) | build seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs.values():
        lines.append(
            f"| {r['name']} | {r['seed']} | {r['top1']:.2f} | {r['nll']:.4f} | {r['ece']:.2f} | "
            f"{r['member_top1'] or 0:.2f} | {r['disagreement'] or 0:.2f} | {r['seconds']:.0f} |"
        )
    text = (
        "# sparse: sweep on the select part (tuned on 1,000 images, scored on the other 1,000)\n\n"
        f"Parent s0 on the scoring half: top-1 {base['top1']:.2f}, NLL {base['nll']:.4f}. Every row costs about 4 "
        "parent-epochs of child tuning; the report part was never read. Build seconds are the wall time of the run "
        "that produced the row, on a shared machine: they compare rows of one session only.\n\n" + "\n".join(lines) + "\n"
    )
    (args.out / "sparse_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
