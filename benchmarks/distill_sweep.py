"""How the ``distill`` defaults are chosen on a converged parent, on the select part only.

    python benchmarks/distill_sweep.py [--parent ../shared/parents/resnet18_cifar10_35ep_s0] [--teacher-options '{"members": 2}']

The teacher is the ``sparse`` artifact a user would have (``boost --method sparse`` with ``--teacher-options``,
views chosen by ``--tta auto``), built once on the first 1,000 images of ``val:select`` and kept in the cache;
every student recipe tunes its temperature on the same 1,000 images and is scored on the other 1,000, beside
the parent trained longer for the same total parent-epochs (teacher's training + the distillation's, from
FLOPs). The report part is never read. Rows already in the results file are kept.
Results: ``distill_sweep_35ep.json`` / ``distill_sweep_35ep.md``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID = {
    "defaults": ("defaults: 1 epoch, T 4, alpha 0.9, max-lr 0.02, teacher's views auto", {}),
    "teacher-none": ("the teacher without the mirror (--teacher-tta none)", {"teacher_tta": "none"}),
    "epochs2": ("2 epochs", {"epochs": 2.0}),
    "t1": ("T 1, alpha 1.0 (match the teacher's probabilities)", {"temperature": 1.0, "alpha": 1.0}),
    "cached": ("--cache-teacher (one teacher pass over one view of each image)", {"cache_teacher": True}),
    "cached2": ("--cache-teacher, 2 epochs", {"cache_teacher": True, "epochs": 2.0}),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_35ep_s0"))
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".cache" / "cifar10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache" / "sweeps")
    ap.add_argument("--teacher-options", default="{}", help="JSON of sparse options for the teacher (default: its defaults)")
    ap.add_argument("--rows", default="all")
    args = ap.parse_args()

    from select_half import scoring_half

    from posthoc import load
    from posthoc.commands.boost import boost
    from posthoc.commands.distill import distill
    from posthoc.evaluate import evaluate, headline

    _, loader, base = scoring_half(args.parent, args.data)
    teacher_dir = args.cache / f"teacher-{Path(args.parent).name}"
    options = json.loads(args.teacher_options)
    if not (teacher_dir / "model.safetensors").is_file():
        args.cache.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        boost(
            [args.parent],
            "sparse",
            args.data,
            teacher_dir,
            select_size=1000,
            overwrite=True,
            progress=False,
            log=print,
            **options,
        )
        print(f"teacher built in {time.perf_counter() - start:.0f} s", flush=True)
    config = json.loads((teacher_dir / "config.json").read_text())
    teacher_pe = config["method"]["measured"]["budget_parent_epochs"]
    teacher = evaluate(load(teacher_dir), loader, show_progress=False)
    results_file = args.out / "distill_sweep_35ep.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    runs = {r["key"]: r for r in saved.get("runs", [])}
    for key in GRID if args.rows == "all" else args.rows.split(","):
        if key in runs:
            continue
        name, recipe = GRID[key]
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            summary = distill(
                str(teacher_dir),
                args.data,
                Path(tmp) / "s",
                select_size=1000,
                overwrite=True,
                progress=False,
                log=lambda m: None,
                **recipe,
            )
            seconds = time.perf_counter() - start
            r = headline(evaluate(load(Path(tmp) / "s"), loader, show_progress=False))
        gain_top1, gain_nll = teacher["top1"] - base["top1"], base["nll"] - teacher["nll"]
        runs[key] = {
            "key": key,
            "name": name,
            "options": recipe,
            "seconds": round(seconds, 1),
            "distill_parent_epochs_flops": round(summary["cost_parent_epochs"], 3),
            "total_parent_epochs": round(teacher_pe + summary["cost_parent_epochs"], 3),
            **r,
            "kept_top1_gain": round((r["top1"] - base["top1"]) / gain_top1, 3) if gain_top1 else None,
            "kept_nll_gain": round((base["nll"] - r["nll"]) / gain_nll, 3) if gain_nll else None,
        }
        print(json.dumps(runs[key]), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        payload = {
            "parent": headline(base),
            "teacher": headline(teacher),
            "teacher_options": options,
            "teacher_parent_epochs": teacher_pe,
        }
        results_file.write_text(json.dumps({**payload, "runs": list(runs.values())}, indent=1) + "\n")
    lines = [
        "| student recipe | total parent-epochs (teacher + distillation) | top-1 | NLL | ECE | share of the teacher's top-1 gain | of its NLL gain |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in runs.values():
        share = lambda v: "-" if v is None else f"{100 * v:.0f}%"
        lines.append(
            f"| {r['name']} | {r['total_parent_epochs']:.1f} | {r['top1']:.2f} | {r['nll']:.4f} | {r['ece']:.2f} | "
            f"{share(r['kept_top1_gain'])} | {share(r['kept_nll_gain'])} |"
        )
    text = (
        "# distill on a converged parent: student recipes on the select part\n\n"
        f"Parent `{Path(args.parent).name}` on the scoring half (the second 1,000 select images): top-1 {base['top1']:.2f}, "
        f"NLL {base['nll']:.4f}; teacher (`boost --method sparse` {options or 'defaults'}, {teacher_pe:g} parent-epochs): "
        f"{teacher['top1']:.2f}, {teacher['nll']:.4f}. Students are one network seeing one view; compare them with "
        '`sparse_sweep_35ep.md`\'s "train longer" rows at the same total parent-epochs. The report part was never read.\n\n'
        + "\n".join(lines)
        + "\n"
    )
    (args.out / "distill_sweep_35ep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
