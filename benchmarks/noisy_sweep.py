"""How the ``noisy`` defaults were chosen, without touching the report split.

    python benchmarks/noisy_sweep.py --data benchmarks/.cache/cifar10 --out benchmarks/results

The 2,000-image select part of ``val/`` is cut once more: the method searches sigma and selects
children on its first 1,000 images (``select_size=1000``, the same shuffled order benchmarks/PROTOCOL.md uses), and the
ensemble is scored on the other 1,000. The report part is never read. Each configuration runs with
several seeds; the JSON keeps every run and the markdown table the means.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _scores(r: dict) -> dict:
    return {"top1": r["top1"], "nll": r["nll"], "ece": r["ece"]}


@torch.no_grad()
def with_parent(ens, parent, loader) -> dict:
    """Scores of the ensemble with the parent added as one more member (probability mean)."""
    from posthoc.metrics import ClassificationMetrics

    m = ClassificationMetrics()
    k = ens.num_members
    for x, y in loader:
        probs = (ens(x) * k + parent(x).softmax(-1)) / (k + 1)
        m.update(probs, y)
    return m.compute()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_s0"))
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".cache" / "cifar10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--grid", default="kl", choices=["kl", "options", "final"])
    args = ap.parse_args()

    from select_half import scoring_half

    from posthoc import load
    from posthoc.commands.boost import boost
    from posthoc.evaluate import evaluate

    parent, loader, base = scoring_half(args.parent, args.data)
    print(f"parent on inner holdout: top-1 {base['top1']:.2f} NLL {base['nll']:.4f}", flush=True)

    if args.grid == "kl":  # include_parent is scored from the same build (members' and parent's probabilities)
        grid = [dict(target_kl=kl) for kl in (0.01, 0.02, 0.05, 0.1, 0.2)]
    elif args.grid == "final":  # the candidates for the defaults and the scoped row, with BN recalibration
        grid = [
            dict(target_kl=0.05),
            dict(target_kl=0.02, last_layers=3),
            dict(target_kl=0.05, last_layers=3),
        ]
    else:
        grid = [dict(target_kl=kl) for kl in (0.02, 0.05, 0.1, 0.2)]
        grid += [dict(target_kl=kl, last_layers=3) for kl in (0.02, 0.05)] + [dict(target_kl=0.05, density=0.2)]
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for cfg in grid:
            for seed in map(int, args.seeds.split(",")):
                start = time.perf_counter()
                out = Path(tmp) / "a"
                summary = boost(
                    [args.parent],
                    "noisy",
                    args.data,
                    out,
                    select_size=1000,
                    overwrite=True,
                    progress=False,
                    log=lambda m: None,
                    seed=seed,
                    **cfg,
                )
                seconds = time.perf_counter() - start
                ens = load(out)
                r = evaluate(ens, loader, show_progress=False)
                common = {
                    "seed": seed,
                    "member_top1": r["member_top1"],
                    "disagreement": r["disagreement"],
                    "sigma": summary["notes"]["sigma"],
                    "kl": summary["notes"]["kl"],
                    "seconds": seconds,
                }
                runs.append({**cfg, "include_parent": False, **common, **_scores(r)})
                print(json.dumps(runs[-1]), flush=True)
                if not cfg.get("include_parent"):
                    runs.append({**cfg, "include_parent": True, **common, **_scores(with_parent(ens, parent, loader))})
                    print(json.dumps(runs[-1]), flush=True)

    keys = sorted(
        {k for r in runs for k in r} - {"seed", "top1", "nll", "ece", "member_top1", "disagreement", "sigma", "kl", "seconds"}
    )
    table = [
        "| " + " | ".join(keys) + " | top-1 - parent | NLL - parent | ECE | member top-1 | disagreement | sigma |",
        "|" + "---|" * (len(keys) + 6),
    ]
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(tuple(r.get(k) for k in keys), []).append(r)
    for key, rs in groups.items():
        mean = lambda f: statistics.mean(r[f] for r in rs)
        table.append(
            "| "
            + " | ".join(str(v) for v in key)
            + f" | {mean('top1') - base['top1']:+.2f} | {mean('nll') - base['nll']:+.4f} | {mean('ece'):.2f} | "
            f"{mean('member_top1'):.2f} | {mean('disagreement'):.2f} | {mean('sigma'):.4g} |"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"noisy_sweep_{args.grid}"
    (args.out / f"{name}.json").write_text(
        json.dumps({"parent": {"top1": base["top1"], "nll": base["nll"]}, "runs": runs}, indent=1)
    )
    text = (
        f"# noisy: {args.grid} sweep on the select part (tune on 1,000 images, score on the other 1,000)\n\n"
        f"Parent on the scoring half: top-1 {base['top1']:.2f}%, NLL {base['nll']:.4f}. Means over seeds {args.seeds}.\n\n"
        + "\n".join(table)
        + "\n"
    )
    (args.out / f"{name}.md").write_text(text)
    print(text)


if __name__ == "__main__":
    torch.set_num_threads(torch.get_num_threads())
    main()
