"""How the ``distill`` defaults were chosen, on the select part only.

    python benchmarks/distill_sweep.py --teacher runs/deep4 --data benchmarks/.cache/cifar10 --rows 0,1

As ``noisy_sweep.py``: the student's temperature is fitted on the first 1,000 images of ``val:select``
(``select_size=1000``) and the student is scored on the other 1,000; the report part is never read. The
teacher is the deep ensemble of the four CIFAR-10 parents that ``benchmarks/cifar10.py`` builds (row
``deep4``), the student parent s0, one epoch each (the issue's budget is 2 parent-epochs, and an epoch
with a four-member teacher on the fly costs about 1.6). Rows are kept in the JSON as they finish, so
``--rows`` can add configurations to an earlier run.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = [
    ("defaults: T 4, alpha 0.9, max-lr 0.02", {}),
    ("T 1, alpha 1.0 (match the ensemble's probabilities)", {"temperature": 1.0, "alpha": 1.0}),
    ("T 4, alpha 0.9, max-lr 0.05", {"max_lr": 0.05}),
    ("T 4, alpha 0.9, max-lr 0.005", {"max_lr": 0.005}),
    ("T 2, alpha 1.0", {"temperature": 2.0, "alpha": 1.0}),
    ("consensus (Noel 2017)", {"consensus": True}),
    ("T 4, alpha 0.9, mixup 1.0 (teacher on the mixed images)", {"mixup": 1.0}),
    ("T 1, alpha 1.0, mixup 1.0 (function matching)", {"temperature": 1.0, "alpha": 1.0, "mixup": 1.0}),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--teacher", required=True, help="the deep-ensemble artifact (cifar10.py's runs/deep4)")
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_s0"))
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".cache" / "cifar10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--rows", default="all", help="comma-separated row indices of the grid, or all")
    ap.add_argument("--epochs", type=float, default=1.0)
    args = ap.parse_args()

    from select_half import scoring_half

    from posthoc import load
    from posthoc.command_options import DistillConfig
    from posthoc.commands.distill import distill
    from posthoc.evaluate import evaluate

    _, loader, base = scoring_half(args.parent, args.data)
    teacher = evaluate(load(args.teacher), loader, show_progress=False)
    print(f"scoring half: parent {base['top1']:.2f} / {base['nll']:.4f}, teacher {teacher['top1']:.2f} / {teacher['nll']:.4f}")
    results_file = args.out / "distill_sweep.json"
    previous = json.loads(results_file.read_text())["runs"] if results_file.exists() else []
    runs = {(r["name"], r["epochs"]): r for r in previous}
    wanted = range(len(GRID)) if args.rows == "all" else map(int, args.rows.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        for i in wanted:
            name, options = GRID[i]
            start = time.perf_counter()
            summary = distill(
                args.teacher,
                args.data,
                Path(tmp) / "s",
                student=args.parent,
                config=DistillConfig(epochs=args.epochs, **options),
                select_size=1000,
                overwrite=True,
                progress=False,
                log=lambda m: None,
            )
            seconds = time.perf_counter() - start
            r = evaluate(load(Path(tmp) / "s"), loader, show_progress=False)
            gain_top1, gain_nll = teacher["top1"] - base["top1"], base["nll"] - teacher["nll"]
            runs[(name, args.epochs)] = {
                "name": name,
                "options": options,
                "epochs": args.epochs,
                "seconds": round(seconds, 1),
                "cost_parent_epochs_flops": summary.get("cost_parent_epochs"),
                "top1": r["top1"],
                "nll": r["nll"],
                "ece": r["ece"],
                "kept_top1_gain": round((r["top1"] - base["top1"]) / gain_top1, 3),
                "kept_nll_gain": round((base["nll"] - r["nll"]) / gain_nll, 3),
            }
            print(json.dumps(runs[(name, args.epochs)]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            results_file.write_text(
                json.dumps({"parent": _headline(base), "teacher": _headline(teacher), "runs": list(runs.values())}, indent=1)
            )
    lines = [
        "| configuration | epochs | top-1 | NLL | ECE | share of the top-1 gain | share of the NLL gain | build seconds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs.values():
        lines.append(
            f"| {r['name']} | {r['epochs']:g} | {r['top1']:.2f} | {r['nll']:.4f} | {r['ece']:.2f} | "
            f"{100 * r['kept_top1_gain']:.0f}% | {100 * r['kept_nll_gain']:.0f}% | {r['seconds']:.0f} |"
        )
    text = (
        "# distill: sweep on the select part (temperature fitted on 1,000 images, scored on the other 1,000)\n\n"
        f"On the scoring half, parent s0: top-1 {base['top1']:.2f}, NLL {base['nll']:.4f}; teacher (deep ensemble of "
        f"4): {teacher['top1']:.2f}, {teacher['nll']:.4f}. The report part was never read. Build seconds are the wall "
        "time of the run that produced the row, on a shared machine whose speed changes between sessions: they "
        "compare rows of one session only.\n\n" + "\n".join(lines) + "\n"
    )
    (args.out / "distill_sweep.md").write_text(text)
    print(text)


def _headline(r: dict) -> dict:
    return {"top1": r["top1"], "nll": r["nll"], "ece": r["ece"]}


if __name__ == "__main__":
    main()
