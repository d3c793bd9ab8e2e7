"""How the inference-cost defaults of ``noisy`` and ``resample`` were chosen, on the select part only.

    python benchmarks/budget_sweep.py --data benchmarks/.cache/cifar10 --out benchmarks/results

A default may spend more inference (more members, or members that differ in more layers) only where,
on the select part, it beats the cheaper configuration by more than the seed-to-seed spread. As in
``noisy_sweep.py``, methods tune on the first 1,000 images of ``val:select`` and ensembles are scored
on the other 1,000. One build gives a whole curve: ``noisy`` orders its members (the parent, then the
children best first), so the first k members are the k-member ensemble; ``resample`` writes the mean
model and eight draws, and the mean, the draws and both are scored from the same build.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
NOISY = [("every layer", None), ("last 3 layers", 3), ("last 2 layers", 2), ("classifier only", 1)]


@torch.no_grad()
def member_probs(artifact: Path, loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Each member's probabilities (K, N, C) on ``loader`` and the targets."""
    from posthoc import load

    module = load(artifact)
    out, ys = [], []
    for x, y in loader:
        out.append(module(x, return_members=True)[1].float())
        ys.append(y)
    return torch.cat(out, dim=1), torch.cat(ys)


def score(probs: torch.Tensor, y: torch.Tensor) -> dict:
    from posthoc.metrics import ClassificationMetrics

    m = ClassificationMetrics()
    m.update(probs, y)
    r = m.compute()
    return {"top1": round(r["top1"], 3), "nll": round(r["nll"], 5)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_s0"))
    ap.add_argument("--data", type=Path, default=ROOT / "benchmarks" / ".cache" / "cifar10")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--seeds", default="0,1")
    args = ap.parse_args()

    from select_half import scoring_half

    from posthoc.commands.boost import boost
    from posthoc.cost import flops_ratio
    from posthoc.sources import load_artifact

    parent, loader, base = scoring_half(args.parent, args.data)
    rows = []
    common = dict(select_size=1000, overwrite=True, progress=False, log=lambda m: None, temperature_scaling=False)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "a"
        for seed in map(int, args.seeds.split(",")):
            for label, layers in NOISY:
                boost([args.parent], "noisy", args.data, out, seed=seed, members=9, last_layers=layers, **common)
                probs, y = member_probs(out, loader)
                full = flops_ratio(load_artifact(out), parent)
                for k in (1, 2, 3, 5, 9):
                    ratio = 1 + (full - 1) * (k - 1) / 8  # the parent and k - 1 children share what they share
                    rows.append(
                        {
                            "method": "noisy",
                            "config": f"{label}, {k} members",
                            "seed": seed,
                            "flops_ratio": round(ratio, 3),
                            **score(probs[:k].mean(0), y),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
            boost([args.parent], "resample", args.data, out, seed=seed, members=9, include_mean=True, **common)
            probs, y = member_probs(out, loader)
            for label, chosen in (
                ("mean model", [0]),
                ("8 draws", list(range(1, 9))),
                ("mean + 8 draws", list(range(9))),
                ("mean + 2 draws", [0, 1, 2]),
            ):
                rows.append(
                    {
                        "method": "resample",
                        "config": label,
                        "seed": seed,
                        "flops_ratio": float(len(chosen)),
                        **score(probs[chosen].mean(0), y),
                    }
                )
                print(json.dumps(rows[-1]), flush=True)
    lines = [
        "| method | configuration | FLOPs (x parent) | top-1 - parent | NLL - parent | NLL spread over seeds |",
        "|---|---|---:|---:|---:|---:|",
    ]
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["method"], r["config"]), []).append(r)
    for (method, config), rs in groups.items():
        nlls = [r["nll"] for r in rs]
        lines.append(
            f"| {method} | {config} | {rs[0]['flops_ratio']:.2f} | {statistics.mean(r['top1'] for r in rs) - base['top1']:+.2f} | "
            f"{statistics.mean(nlls) - base['nll']:+.4f} | {max(nlls) - min(nlls):.4f} |"
        )
    text = (
        "# Inference cost against gain on the select part (tuned on 1,000 images, scored on the other 1,000)\n\n"
        f"Parent s0 on the scoring half: top-1 {base['top1']:.2f}, NLL {base['nll']:.4f}. Means over seeds {args.seeds}; "
        "no temperature (it is fitted after the choice). The report part was never read.\n\n" + "\n".join(lines) + "\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "budget_sweep.json").write_text(
        json.dumps({"parent": {"top1": base["top1"], "nll": base["nll"]}, "runs": rows}, indent=1)
    )
    (args.out / "budget_sweep.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
