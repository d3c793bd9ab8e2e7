"""Wall time of ``eval`` and ``resample`` on 1, 2, ... processes under torchrun, on the CIFAR-10 parent.

    python benchmarks/distributed.py --shared ../shared --out benchmarks/results [--processes 1,2] [--subset N]

For each process count N the script starts ``torchrun --standalone --nproc-per-node N`` on itself, and
every process runs two phases, each timed on rank 0 from a barrier to its end:

- ``eval``: the parent on ``val/`` (5,000 images, batch 256), the batches divided among the processes
  (``posthoc eval``'s path: ``evaluate_spec``); setup (loading the model, indexing the split) is timed
  apart from the evaluation itself;
- ``resample``: ``posthoc boost --method resample --members 1 --include-mean`` with the global batch
  fixed at 128 (``--batch-size 128/N`` per process), so every N runs the same number of SGD steps on
  the same global batches; the fine-tune (DistributedDataParallel) is timed from the method's own log
  lines, the rest of the command (loading, indexing, BatchNorm re-estimation, rank 0's calibration,
  measurement and writing) apart from it.

On CPU each process gets ``cores / N`` intra-op threads (``--threads`` to fix it), so every N uses the
same cores; with GPUs each
process takes one GPU (``--device cuda``; N up to the number of GPUs, ``--processes 1,2,4,8`` by default).

The 8-GPU figure is a prediction, not a measurement: Amdahl's law from the one-process breakdown
(the part that is split among processes divided by 8, the rest kept), which leaves out communication
(DDP's gradient all-reduce, the metric gathers) and the smaller per-GPU batch, so it is an upper bound
on the speed-up. On a CPU machine the processes share the same cores, so measured speed-ups there say
what the split costs, not what more devices give.

Results: ``distributed_<cpu|cuda>.json`` and ``.md`` in ``--out``. ``--subset N`` uses N training images
and N evaluation images, for a quick check of the script.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GLOBAL_BATCH = 128  # resample's default --batch-size with one process
PREDICT_DEVICES = 8


# ------------------------------------------------------------------------------------ worker (one process of N)
def worker(args: argparse.Namespace) -> int:
    """One process of a torchrun launch: time the two phases; rank 0 writes the timings to ``args.record``."""
    from posthoc import distributed

    def body() -> int:
        record = {"processes": distributed.world_size(), "eval": time_eval(args), "resample": time_resample(args)}
        if distributed.is_main():
            Path(args.record).write_text(json.dumps(record, indent=2))
        return 0

    return distributed.run(body, report=lambda line: print(f"error: {line}", file=sys.stderr))


def time_eval(args: argparse.Namespace) -> dict:
    from posthoc import data as data_mod
    from posthoc import distributed
    from posthoc.evaluate import evaluate
    from posthoc.runtime import resolve_device
    from posthoc.sources import load_model

    distributed.barrier()
    start = time.perf_counter()
    device = resolve_device(args.device)
    model = load_model(args.parent)
    config = data_mod.resolve_data_config(model)
    dataset = data_mod.open_split(args.data, "val", data_mod.eval_transform(config), subset=args.subset)
    loader = data_mod.make_loader(dataset, 256, workers=args.workers, shard="batches")
    setup = time.perf_counter() - start
    distributed.barrier()
    start = time.perf_counter()
    result = evaluate(model, loader, device=device, data_config=config, show_progress=False)
    seconds = time.perf_counter() - start
    return {
        "setup_s": round(setup, 2),
        "split_s": round(seconds, 2),
        "wall_s": round(setup + seconds, 2),
        "images": result["images"],
        "images_per_s": round(result["images"] / seconds, 1),
        "forward_images_per_s": result["throughput"],
        "top1": result["top1"],
    }


def time_resample(args: argparse.Namespace) -> dict:
    from posthoc import distributed
    from posthoc.commands.boost import boost

    marks: dict[str, float] = {}

    def log(line: str) -> None:  # the method's own log lines bracket its fine-tune
        if line.startswith("fine-tuning "):
            marks["start"] = time.perf_counter()
        elif line.startswith("fine-tuned in"):
            marks["end"] = time.perf_counter()

    out = Path(args.scratch) / f"resample-{distributed.world_size()}"
    distributed.barrier()
    start = time.perf_counter()
    summary = boost(
        [args.parent],
        "resample",
        args.data,
        out,
        device=args.device,
        workers=args.workers,
        subset=args.subset,
        overwrite=True,
        progress=False,
        log=log,
        members=1,
        include_mean=True,
        batch_size=GLOBAL_BATCH // distributed.world_size(),
    )
    wall = time.perf_counter() - start
    finetune = marks["end"] - marks["start"] if {"start", "end"} <= set(marks) else float("nan")
    return {
        "split_s": round(finetune, 2),
        "setup_s": round(wall - finetune, 2),
        "wall_s": round(wall, 2),
        "steps": summary["notes"]["steps"],
        "global_batch": GLOBAL_BATCH,
        "select_top1": summary["ensemble"]["top1"],
    }


# ------------------------------------------------------------------------------------ driver
def launch(n: int, args: argparse.Namespace, cores: int, scratch: Path) -> dict:
    """Run the worker on ``n`` processes under torchrun; return rank 0's record and the launch's wall time."""
    record = scratch / f"record-{n}.json"
    env = dict(os.environ)
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads or max(1, cores // n))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}", __file__]
    command += ["--worker", "--record", str(record), "--scratch", str(scratch), "--parent", args.parent]
    command += ["--data", str(args.data), "--device", args.device, "--workers", str(args.workers)]
    command += ["--subset", str(args.subset)] if args.subset else []
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0 or not record.exists():
        raise SystemExit(f"{n} process(es) failed:\n{done.stderr[-3000:]}")
    return {**json.loads(record.read_text()), "launch_wall_s": round(wall, 2)}


def predict(one: dict, devices: int) -> dict:
    """Amdahl's law from one process's breakdown: the split part divided by ``devices``, the rest kept."""
    return {
        phase: {
            "wall_s": round(one[phase]["setup_s"] + one[phase]["split_s"] / devices, 2),
            "speedup": round(one[phase]["wall_s"] / (one[phase]["setup_s"] + one[phase]["split_s"] / devices), 2),
        }
        for phase in ("eval", "resample")
    }


def table(records: list[dict], prediction: dict, device: str, machine: str) -> str:
    """The markdown table: measured rows, then the 8-device prediction."""
    one = records[0]
    lines = [
        f"# Distributed eval and resample, CIFAR-10 ResNet-18 parent ({machine})\n",
        "Wall seconds on rank 0 per phase (split part + the rest); speed-up over one process. Resample keeps the "
        f"global batch at {GLOBAL_BATCH}.\n",
        "| processes | eval (s) | eval split part (s) | eval img/s | eval speed-up | resample (s) | fine-tune (s) | "
        "resample speed-up |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in records:
        e, s = r["eval"], r["resample"]
        lines.append(
            f"| {r['processes']} | {e['wall_s']:.1f} | {e['split_s']:.1f} | {e['images_per_s']:.0f} | "
            f"{one['eval']['wall_s'] / e['wall_s']:.2f}x | {s['wall_s']:.1f} | {s['split_s']:.1f} | "
            f"{one['resample']['wall_s'] / s['wall_s']:.2f}x |"
        )
    p = prediction
    lines.append(
        f"| {PREDICT_DEVICES} {'GPUs' if device == 'cuda' else 'devices'} (predicted) | {p['eval']['wall_s']:.1f} | | | "
        f"{p['eval']['speedup']:.2f}x | {p['resample']['wall_s']:.1f} | | {p['resample']['speedup']:.2f}x |"
    )
    lines.append(
        f"\nThe last row is Amdahl's law on the one-process breakdown (split part / {PREDICT_DEVICES}, the rest kept): "
        "an upper bound that leaves out communication and the smaller per-device batch."
    )
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared")
    ap.add_argument("--cache", type=Path, default=ROOT / "benchmarks" / ".cache")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--processes", default=None, help="Process counts, e.g. 1,2 (default: 1,2 on CPU, 1,2,4,8 GPUs).")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present).")
    ap.add_argument("--subset", type=int, default=None, help="Use N training and N evaluation images (a quick check).")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers per process.")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads per process (default: cores / processes).")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--record", help=argparse.SUPPRESS)
    ap.add_argument("--scratch", help=argparse.SUPPRESS)
    ap.add_argument("--parent", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.exit(worker(args))

    import torch

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cifar10 import prepare_data

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    gpus = torch.cuda.device_count() if args.device == "cuda" else 0
    counts = [int(n) for n in (args.processes or ("1,2,4,8" if gpus else "1,2")).split(",")]
    counts = [n for n in counts if not gpus or n <= gpus]
    args.parent = args.parent or str(args.shared / "parents" / "resnet18_cifar10_s0")
    args.data = args.data or prepare_data(args.shared, args.cache)
    cores = os.cpu_count() or 1
    machine = (
        f"{gpus} x {torch.cuda.get_device_name(0)}"
        if gpus
        else f"{cores} CPU cores ({platform.processor() or platform.machine()})"
    )
    scratch = Path(tempfile.mkdtemp(prefix="posthoc-distributed-"))
    try:
        records = []
        for n in counts:
            print(f"{n} process(es) ...", flush=True)
            records.append(launch(n, args, cores, scratch))
            r = records[-1]
            print(
                f"  eval {r['eval']['wall_s']:.1f} s ({r['eval']['images_per_s']:.0f} img/s), resample {r['resample']['wall_s']:.1f} s"
            )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    prediction = predict(records[0], PREDICT_DEVICES)
    report = {
        "machine": machine,
        "device": args.device,
        "subset": args.subset,
        "threads_per_process": args.threads or "cores / processes",
        "torch": torch.__version__,
        "records": records,
        f"predicted_{PREDICT_DEVICES}": prediction,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    name = f"distributed_{args.device}"
    (args.out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.out / f"{name}.md").write_text(table(records, prediction, args.device, machine))
    print(table(records, prediction, args.device, machine))


if __name__ == "__main__":
    main()
