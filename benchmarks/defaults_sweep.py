"""Re-checks, on a converged parent's select part, the defaults of the methods that were chosen on the
15-epoch parent (issue 27): each method's defaults against its most sensitive knob moved both ways.

    python benchmarks/defaults_sweep.py [--parent ../shared/parents/resnet18_cifar10_35ep_s0] [--rows noisy,resample]

As ``sparse_sweep.py``: every configuration tunes on the first 1,000 images of ``val:select`` and is scored on
the other 1,000, as built (views by ``--tta auto``) and with the image alone; the report part is never read.
Rows already in the results file are kept. Results: ``defaults_35ep.json`` / ``defaults_35ep.md``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GRID: dict[str, list[tuple[str, dict]]] = {
    "noisy": [("defaults", {}), ("--target-kl 0.02", {"target_kl": 0.02}), ("--target-kl 0.1", {"target_kl": 0.1})],
    "resample": [("defaults", {}), ("--lr 0.05", {"lr": 0.05}), ("--lr 0.2", {"lr": 0.2})],
    "lastlayer": [("defaults", {}), ("--lr 0.01", {"lr": 0.01}), ("--lr 0.001", {"lr": 0.001})],
    "supernet": [("defaults", {}), ("--lr 0.02", {"lr": 0.02})],
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_35ep_s0"))
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".cache" / "cifar10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--rows", default="all", help="comma-separated methods of the grid, or all")
    ap.add_argument("--redo", action="store_true")
    ap.add_argument("--table-only", action="store_true", help="write the markdown table from the results file and stop")
    args = ap.parse_args()

    from select_half import run_config, scoring_half, tuning_half

    from posthoc.calibration import with_views
    from posthoc.evaluate import evaluate, headline

    results_file = args.out / "defaults_35ep.json"
    saved = json.loads(results_file.read_text()) if results_file.exists() else {}
    if args.table_only:
        (args.out / "defaults_35ep.md").write_text(render(saved))
        return
    parent, scoring, base = scoring_half(args.parent, args.data)
    flip = evaluate(with_views(parent, ("identity", "hflip")), scoring, show_progress=False)
    tuning = tuning_half(parent, args.data)
    runs = {(r["method"], r["name"]): r for r in saved.get("runs", [])}
    for method in GRID if args.rows == "all" else args.rows.split(","):
        for name, config in GRID[method]:
            if (method, name) in runs and not args.redo:
                continue
            runs[(method, name)] = {
                "method": method,
                "name": name,
                "config": config,
                **run_config(method, args.parent, args.data, config, 0, scoring, tuning),
            }
            print(json.dumps(runs[(method, name)]), flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            payload = {
                "parent_spec": args.parent,
                "parent": headline(base),
                "parent_flip": headline(flip),
                "runs": list(runs.values()),
            }
            results_file.write_text(json.dumps(payload, indent=1) + "\n")
    text = render(
        {"parent_spec": args.parent, "parent": headline(base), "parent_flip": headline(flip), "runs": list(runs.values())}
    )
    (args.out / "defaults_35ep.md").write_text(text)
    print(text)


def render(payload: dict) -> str:
    """The markdown table of a results file: each method's configurations, as built and with the image alone."""
    base, flip = payload["parent"], payload["parent_flip"]
    lines = [
        "| method | configuration | views chosen | top-1 | NLL | top-1 (image alone) | NLL (image alone) | FLOPs (x parent) |",
        "|---|---|---|---:|---:|---:|---:|---:|",
        f"| parent | | identity | {base['top1']:.2f} | {base['nll']:.4f} | | | 1.00 |",
        f"| parent + flip | | identity + hflip | {flip['top1']:.2f} | {flip['nll']:.4f} | | | 2.00 |",
    ]
    for r in payload["runs"]:
        a, n = r["auto"], r["none"]
        lines.append(
            f"| {r['method']} | {r['name']} | {' + '.join(r['views'])} | {a['top1']:.2f} | {a['nll']:.4f} | {n['top1']:.2f} | "
            f"{n['nll']:.4f} | {r['flops_ratio']:.2f} |"
        )
    return (
        f"# Method defaults re-checked on a converged parent (select part)\n\nParent `{Path(payload['parent_spec']).name}`; tuned on "
        "the first 1,000 images of `val:select`, scored on the other 1,000 (about +-0.5 top-1 and +-0.01 NLL is noise "
        'there). "image alone": the same members with views `none`.\n\n' + "\n".join(lines) + "\n"
    )


if __name__ == "__main__":
    main()
