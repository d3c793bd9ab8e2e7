"""Inference speed of fused artifacts, side by side with the parent and a naive loop over members.

    python benchmarks/inference.py --parent ../shared/parents/resnet18_cifar10_s0 --out benchmarks/results

For K in {1, 4, 8} and batch in {1, 32, 256}, in one process on the same machine, it times:
``single`` (the parent alone), ``loop`` (K plain timm models called one after the other, what a user
would write) and ``fused`` (``posthoc.load`` of the artifact, default strategy), plus ``fused-vmap``
(the batched strategy forced), ``fused-loop`` (members one after another, to show what running them
side by side on CPU threads gives) and ``fused-unfolded`` (BatchNorm not folded into the convolutions, to
show what folding gives). Two member families:

- ``head``: members differ only in the classifier (e.g. a SuperNet or a noisy ``--scope 0`` artifact);
- ``full``: every weight differs (a deep ensemble, a default noisy artifact).

The ``onnx`` section times the file ``posthoc export`` writes, run by ONNX Runtime (CPU execution
provider, as many intra-op threads as torch), against the eager parent and ``posthoc.load`` in the same
interleaved rounds, for the parent itself (exported as a one-network artifact), a head-only ensemble
of 8 and a full ensemble of 4, at batch 1, 32 and 256. ``ORT stacked`` is the alternative graph with the
members batched (``vmap``: grouped convolutions, batched matrix products), which exports only at a fixed
batch, so it is exported once per batch size. ``benchmarks/gpu.py`` times the same rows on a GPU.

Timings interleave the variants over several rounds and keep the median, because the machines are
shared and noisy. Speeds are reported as ratios; nothing here is a test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def members(parent: torch.nn.Module, k: int, family: str) -> list[torch.nn.Module]:
    """K perturbed copies of ``parent``: only the classifier (``head``) or every weight (``full``)."""
    out = []
    for i in range(k):
        m = copy.deepcopy(parent)
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            params = m.get_classifier().parameters() if family == "head" else m.parameters()
            for p in params:
                p.add_(1e-3 * torch.randn(p.shape, generator=g))
        out.append(m.eval())
    return out


def foreign_cpu_seconds() -> float | None:
    """CPU seconds the machine has spent busy outside this process so far (``/proc/stat`` less this process's
    own time), or None where there is no ``/proc/stat``."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:9]]
    except OSError:
        return None
    busy = (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # all but idle and iowait
    own = os.times()
    return busy - own.user - own.system


def time_variants(
    variants: dict,
    x: torch.Tensor,
    rounds: int,
    min_seconds: float,
    sync,
    quiet: float | None = None,
    max_wait: float = 600.0,
    stats: dict | None = None,
) -> dict[str, float]:
    """Median seconds per call of each variant, interleaved over ``rounds`` rounds.

    With ``quiet`` (a fraction, e.g. 0.1), a round during which other processes kept the machine's CPUs busy
    for more than that fraction of the round's wall time is measured again after a pause, for up to
    ``max_wait`` seconds in all (then kept as it is): on a shared machine, a test suite running beside the
    benchmark slows torch's OpenMP threads far more than ONNX Runtime's, which would bias the comparison.
    ``stats`` receives the number of discarded rounds and of rounds kept although contended.
    """
    samples: dict[str, list[float]] = {k: [] for k in variants}
    stats = stats if stats is not None else {}
    stats.setdefault("discarded_rounds", 0)
    stats.setdefault("contended_rounds", 0)
    waited, cores = 0.0, os.cpu_count() or 1
    with torch.inference_mode():
        for fn in variants.values():  # warm-up
            fn(x)
        done = 0
        while done < rounds:
            before, start_round = foreign_cpu_seconds(), time.perf_counter()
            times = {}
            for name, fn in variants.items():
                n, start = 0, time.perf_counter()
                while True:
                    fn(x)
                    n += 1
                    sync()
                    elapsed = time.perf_counter() - start
                    if elapsed >= min_seconds:
                        break
                times[name] = elapsed / n
            after, wall = foreign_cpu_seconds(), time.perf_counter() - start_round
            busy = None if quiet is None or before is None or after is None else (after - before) / (wall * cores)
            if busy is not None and busy > quiet:
                if waited < max_wait:
                    stats["discarded_rounds"] += 1
                    time.sleep(5.0)
                    waited += 5.0 + wall
                    continue
                stats["contended_rounds"] += 1
            for name, t in times.items():
                samples[name].append(t)
            done += 1
    return {k: statistics.median(v) for k, v in samples.items()}


ONNX_ROWS = (("parent", 1), ("head", 8), ("full", 4))
FAMILY_TEXT = {"parent": "the parent", "head": "classifier only", "full": "every weight"}


def ort_runner(path: Path, providers: list[str], device: torch.device):
    """A function running an ONNX file with ONNX Runtime on a torch batch: CPU inputs as numpy; on CUDA the
    input and outputs stay on the GPU (I/O binding), as a serving engine would keep them."""
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads() if device.type == "cpu" else 0
    # idle ORT threads would otherwise spin between calls and steal the cores from the torch variants timed in
    # between (interleaved rounds); a server running ONNX Runtime alone may keep spinning on
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(str(path), options, providers=providers)
    if device.type == "cpu":
        return lambda x: session.run(None, {"images": x.numpy()})
    outputs = [o.name for o in session.get_outputs()]

    def run(x: torch.Tensor):
        binding = session.io_binding()
        x = x.contiguous()
        binding.bind_input("images", "cuda", device.index or 0, np.float32, tuple(x.shape), x.data_ptr())
        for name in outputs:
            binding.bind_output(name, "cuda", device.index or 0)
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        return binding.get_outputs()

    return run


def export_stacked(artifact: Path, out: Path, shape: tuple[int, ...]) -> Path:
    """The stacked alternative to ``posthoc export``'s graph: members batched with ``vmap`` (grouped
    convolutions, batched matrix products). Its convolution batching rule reads the batch size, so it only
    exports at the fixed batch of ``shape``."""
    import posthoc
    from posthoc.export import ExportableEnsemble

    wrapper = ExportableEnsemble(posthoc.load(artifact)).eval()
    wrapper.ensemble.strategy = "vmap"
    with torch.no_grad():
        program = torch.export.export(wrapper, (torch.randn(*shape),), strict=False)
    torch.onnx.export(program, dynamo=True, input_names=["images"], output_names=["probs"], verbose=False).save(str(out))
    return out


def onnx_records(
    parent_path: str,
    tmp: Path,
    device: torch.device,
    providers: dict[str, list[str]],
    batches: list[int],
    rounds: int,
    min_seconds: float,
    sync,
    stacked: bool = True,
    quiet: float | None = 0.1,
) -> list[dict]:
    """Times of the exported file under each ONNX Runtime provider set (``providers``: label -> providers),
    of the stacked graph (``stacked``, under the first provider set), of ``posthoc.load`` and of the eager parent,
    interleaved, for the rows of ``ONNX_ROWS``; ratios to the eager parent of the same run. Rounds during
    which other processes kept more than ``quiet`` of the CPUs busy are measured again (:func:`time_variants`)."""
    import posthoc
    from posthoc import Ensemble, load_model
    from posthoc.commands.export import export_artifact

    parent = load_model(parent_path).to(device).eval()
    size = tuple(parent.pretrained_cfg["input_size"])
    records = []
    for family, k in ONNX_ROWS:
        nets = [load_model(parent_path).eval()] if family == "parent" else members(load_model(parent_path), k, family)
        path = tmp / f"onnx-{family}{k}"
        posthoc.save(Ensemble.from_models(nets), path)
        exported = export_artifact(path, tmp / f"{family}{k}.onnx")
        fused = posthoc.load(path).to(device)
        runners = {f"ORT {label}": ort_runner(Path(exported["out"]), p, device) for label, p in providers.items()}
        for batch in batches:
            x = torch.randn(batch, *size, device=device)
            variants = {"eager parent": parent, "posthoc.load": fused, **runners}
            if stacked and family != "parent":
                graph = export_stacked(path, tmp / f"{family}{k}-stacked-{batch}.onnx", (batch, *size))
                variants["ORT stacked"] = ort_runner(graph, next(iter(providers.values())), device)
                with torch.inference_mode():
                    diff = float(abs(torch.as_tensor(variants["ORT stacked"](x)[0]).cpu() - fused(x).cpu()).max())
                assert diff < 1e-4, f"the stacked graph differs from posthoc.load by {diff}"
            stats: dict = {}
            t = time_variants(variants, x, rounds, min_seconds, sync, quiet=quiet, stats=stats)
            ratio = {name: t[name] / t["eager parent"] for name in t}
            rec = {
                "family": family,
                "members": k,
                "batch": batch,
                "device": device.type,
                "providers": providers,
                "images_per_second": {name: batch / s for name, s in t.items()},
                "time_over_eager_parent": ratio,
                "export_mb": round(exported["bytes"] / 1e6, 1),
                "export_max_abs_diff": exported["max_abs_diff"],
                **stats,
            }
            records.append(rec)
            print(
                f"onnx {family:6s} K={k} batch={batch:3d}: "
                + "  ".join(f"{name} {batch / s:7.0f} img/s ({ratio[name]:.2f}x time)" for name, s in t.items()),
                flush=True,
            )
    return records


def onnx_table(records: list[dict], device: str, note: str = "") -> list[str]:
    """The markdown of the ONNX rows, with the targets' verdicts (against the first ONNX Runtime provider);
    ``note`` opens the explanation (when and where it was measured)."""
    names = list(dict.fromkeys(n for r in records for n in r["images_per_second"] if n != "eager parent"))
    ort_names = [n for n in names if n.startswith("ORT") and n != "ORT stacked"]
    first = ort_names[0] if ort_names else None
    lines = [
        f"\n## Exported files in ONNX Runtime ({device})\n",
        note + "images/s, median of interleaved rounds; in brackets, time per image over the eager parent's in the same run "
        "(lower is faster). `eager parent`: the timm model; `posthoc.load`: the artifact as loaded; `ORT ...`: the file "
        "`posthoc export` writes (members unrolled, dynamic batch), run by ONNX Runtime with that execution provider; "
        "`ORT stacked`: the same ensemble with the members batched (grouped convolutions; exportable only at a fixed batch, "
        "so exported per batch size).\n",
        "| members differ in | K | batch | eager parent | "
        + " | ".join(names)
        + (f" | posthoc.load time / {first} time |" if first else " |"),
        "|---|---:|---:|---:|" + "---:|" * (len(names) + bool(first)),
    ]
    for r in records:
        ips, ratio = r["images_per_second"], r["time_over_eager_parent"]
        cells = [f"{ips[n]:.0f} ({ratio[n]:.2f})" if n in ips else "" for n in names]
        if first:
            cells.append(f"{ratio['posthoc.load'] / ratio[first]:.2f}")
        lines.append(
            f"| {FAMILY_TEXT[r['family']]} | {r['members']} | {r['batch']} | {ips['eager parent']:.0f} | "
            + " | ".join(cells)
            + " |"
        )
    discarded, contended = (sum(r.get(key, 0) for r in records) for key in ("discarded_rounds", "contended_rounds"))
    lines.append(
        f"\nRounds during which other processes kept over 10% of the CPUs busy were measured again after a pause: "
        f"{discarded} such rounds discarded, {contended} kept because the machine stayed busy."
    )
    if first is None:
        return lines
    full = [r for r in records if r["family"] == "full" and r["batch"] == 32]
    parent = [r for r in records if r["family"] == "parent"]
    if full:
        speed = full[0]["time_over_eager_parent"]["posthoc.load"] / full[0]["time_over_eager_parent"][first]
        lines.append(
            f"\nTarget 1, exported full K=4 at batch 32 no slower than posthoc.load: {first} runs it at {speed:.2f}x "
            f"the speed of posthoc.load: {'met' if speed >= 1 else 'NOT met'}."
        )
    if parent:
        worst = max(r["time_over_eager_parent"][first] for r in parent)
        per_batch = ", ".join(f"{r['time_over_eager_parent'][first]:.2f} at batch {r['batch']}" for r in parent)
        lines.append(
            f"\nTarget 2, exported parent at least as fast as the eager parent: {first} time over eager time {per_batch}: "
            f"{'met' if worst <= 1 else 'NOT met'}."
        )
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parent", default=str(ROOT.parent / "shared" / "parents" / "resnet18_cifar10_s0"))
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--ks", default="1,4,8")
    ap.add_argument("--batches", default="1,32,256")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--min-seconds", type=float, default=0.3)
    ap.add_argument("--sections", default="torch,onnx", help="torch (posthoc.load and loops), onnx (exported files), or both")
    args = ap.parse_args()
    sections = set(args.sections.split(","))

    import timm

    import posthoc
    from posthoc import Ensemble, load_model

    device = torch.device(args.device)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    parent = load_model(args.parent).to(device).eval()
    size = tuple(parent.pretrained_cfg["input_size"])
    records, onnx = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for family in ("head", "full") if "torch" in sections else ():
            for k in map(int, args.ks.split(",")):
                nets = members(load_model(args.parent), k, family)
                path = Path(tmp) / f"{family}{k}"
                posthoc.save(Ensemble.from_models(nets), path)
                fused = posthoc.load(path).to(device)
                fused_vmap = posthoc.load(path, strategy="vmap").to(device)
                fused_loop = posthoc.load(path, strategy="loop").to(device)
                fused_unfolded = posthoc.load(path, fold_bn=False).to(device)
                nets = [n.to(device) for n in nets]
                mb = sum(f.stat().st_size for f in path.iterdir()) / 1e6
                for batch in map(int, args.batches.split(",")):
                    x = torch.randn(batch, *size, device=device, generator=None)
                    t = time_variants(
                        {
                            "single": parent,
                            "loop": lambda x, nets=nets: [n(x).softmax(-1) for n in nets],
                            "fused": fused,
                            "fused-vmap": fused_vmap,
                            "fused-loop": fused_loop,
                            "fused-unfolded": fused_unfolded,
                        },
                        x,
                        args.rounds,
                        args.min_seconds,
                        sync,
                    )
                    rec = {
                        "family": family,
                        "members": k,
                        "batch": batch,
                        "device": device.type,
                        "images_per_second": {n: batch / s for n, s in t.items()},
                        "fused_time_over_single": t["fused"] / t["single"],
                        "fused_speedup_over_loop": t["loop"] / t["fused"],
                        "vmap_speedup_over_loop": t["loop"] / t["fused-vmap"],
                        "bn_folding_speedup": t["fused-unfolded"] / t["fused"],
                        "fused_loop_speedup_over_loop": t["loop"] / t["fused-loop"],
                        "artifact_mb": round(mb, 1),
                    }
                    records.append(rec)
                    print(
                        f"{family:4s} K={k} batch={batch:3d}: single {batch / t['single']:8.0f}  loop {batch / t['loop']:8.0f}  "
                        f"fused {batch / t['fused']:8.0f}  fused-loop {batch / t['fused-loop']:8.0f}  vmap {batch / t['fused-vmap']:8.0f} img/s | fused/single time "
                        f"{rec['fused_time_over_single']:.2f}  fused vs loop x{rec['fused_speedup_over_loop']:.2f}  "
                        f"BN folding x{rec['bn_folding_speedup']:.2f}",
                        flush=True,
                    )
        if "onnx" in sections:
            batches = [int(b) for b in args.batches.split(",")]
            onnx = onnx_records(
                args.parent, Path(tmp), device, {"CPU": ["CPUExecutionProvider"]}, batches, args.rounds, args.min_seconds, sync
            )
    meta = {
        "parent": args.parent,
        "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__,
        "timm": timm.__version__,
        "rounds": args.rounds,
        "onnxruntime": _version("onnxruntime"),
        "date": time.strftime("%Y-%m-%d"),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "" if device.type == "cpu" else f"_{device.type}"
    results = args.out / f"inference{suffix}.json"
    previous = json.loads(results.read_text()) if results.is_file() else {}
    torch_meta, onnx_meta = meta, meta
    if "torch" not in sections:  # a section not run keeps the records of the run that measured it
        records, torch_meta = previous.get("records", []), previous.get("meta", meta)
    if "onnx" not in sections:
        onnx, onnx_meta = previous.get("onnx_records", []), previous.get("onnx_meta", previous.get("meta", meta))
    results.write_text(
        json.dumps({"meta": torch_meta, "records": records, "onnx_meta": onnx_meta, "onnx_records": onnx}, indent=1) + "\n"
    )
    lines = [f"# Inference speed ({device.type})\n"]
    if records:
        lines.append(
            f"Measured {torch_meta.get('date', 'earlier')} ({torch_meta['machine']}; torch {torch_meta['torch']}; "
            f"{torch_meta['rounds']} rounds).\n"
        )
        lines += [
            "images/s, median of interleaved rounds. `loop`: K plain models one after another; `fused`: `posthoc.load` "
            "(shared prefix once, BatchNorm folded into convolutions; member-specific part on CPU threads side by side when "
            "members differ beyond the classifier, else looped; vmap on CUDA); `fused-loop`, `fused-vmap`: those strategies "
            "forced; `unfolded`: fused without BatchNorm folding.\n",
            "| members differ in | K | batch | single | loop | fused | fused-loop | fused-vmap | unfolded | fused time / single | fused / loop speed | folding speed-up |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
    for r in records:
        ips = r["images_per_second"]
        lines.append(
            f"| {'classifier only' if r['family'] == 'head' else 'every weight'} | {r['members']} | {r['batch']} | "
            f"{ips['single']:.0f} | {ips['loop']:.0f} | {ips['fused']:.0f} | {ips['fused-loop']:.0f} | {ips['fused-vmap']:.0f} | "
            f"{ips['fused-unfolded']:.0f} | {r['fused_time_over_single']:.2f} | {r['fused_speedup_over_loop']:.2f} | "
            f"{r['bn_folding_speedup']:.2f} |"
        )
    if onnx:
        lines += onnx_table(
            onnx,
            device.type,
            f"Measured {onnx_meta.get('date')} ({onnx_meta['machine']}; torch {onnx_meta['torch']}; onnxruntime "
            f"{onnx_meta.get('onnxruntime')}; {onnx_meta['rounds']} rounds). ",
        )
    (args.out / f"inference{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def _version(package: str) -> str | None:
    try:
        return __import__(package).__version__
    except ImportError:
        return None


if __name__ == "__main__":
    main()
