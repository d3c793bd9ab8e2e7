"""Several processes: two CPU processes on gloo over loopback, started the way torchrun starts them
(``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``), compared with one process.

Every process runs with one thread, as torchrun sets it, and so does the single-process reference:
float kernels with another thread count may round differently.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posthoc import distributed
from posthoc.cli import main
from posthoc.data import make_loader
from posthoc.errors import PosthocError

from .helpers import QUIET, assert_same_artifact, make_image_folder, save_hub_layout, tiny_model

TIMEOUT = 300
LAUNCH_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_USE_AGENT_STORE")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """An odd-sized validation split (3 x 21 images), a BatchNorm ResNet, a BatchNorm-free ViT."""
    tmp = tmp_path_factory.mktemp("distributed")
    return {
        "data": make_image_folder(tmp / "data", {"train": 40, "val": 21}),
        "resnet": save_hub_layout(tiny_model("test_resnet", seed=0), tmp / "resnet"),
        "resnet1": save_hub_layout(tiny_model("test_resnet", seed=1), tmp / "resnet1"),
        "vit": save_hub_layout(tiny_model("test_vit", seed=0), tmp / "vit"),
    }


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", "COLUMNS": "200", **extra}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(commands: list[list[str]], cwd: Path | None = None) -> list[subprocess.CompletedProcess]:
    """Run ``commands[r]`` (a python command line) as rank r of ``len(commands)`` processes."""
    port, world = str(_free_port()), str(len(commands))
    procs = [
        subprocess.Popen(
            [sys.executable, *command],
            env=_env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=world, MASTER_ADDR="127.0.0.1", MASTER_PORT=port),
            cwd=cwd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r, command in enumerate(commands)
    ]
    try:
        outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, out, err) for p, (out, err) in zip(procs, outs)]


def posthoc_on_two(args: list[str], cwd: Path | None = None) -> list[subprocess.CompletedProcess]:
    """``posthoc ARGS`` on two processes."""
    return launch([["-m", "posthoc", *args]] * 2, cwd)


def posthoc_on_one(args: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
    """``posthoc ARGS`` as one process with one thread (the reference)."""
    return subprocess.run(
        [sys.executable, "-m", "posthoc", *args], env=_env(), cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT
    )


def assert_ok(*runs: subprocess.CompletedProcess) -> None:
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]


# ------------------------------------------------------------------------------------ one process
def test_one_process_changes_nothing(image_data):
    """No launch: no process group, rank 0 of 1, loaders as before, errors as one line and status 2."""
    assert not distributed.launched() and not distributed.active()
    assert (distributed.rank(), distributed.world_size(), distributed.is_main()) == (0, 1, True)
    assert distributed.shard(5) == range(5)
    assert distributed.map_shards(lambda x: x * 2, [1, 2, 3]) == [2, 4, 6]
    from posthoc.data import open_split

    dataset = open_split(image_data, "val")
    plain, sharded = make_loader(dataset, 7, workers=0), make_loader(dataset, 7, workers=0, shard="batches")
    assert list(plain.batch_sampler) == list(sharded.batch_sampler)
    assert not isinstance(sharded.batch_sampler, distributed.ShardedBatches)
    lines = []

    def failing() -> int:
        raise PosthocError("bad thing; fix it")

    assert distributed.run(failing, lines.append) == 2
    assert lines == ["bad thing; fix it"]


def test_the_samplers_split_whole_batches_and_global_batches(monkeypatch):
    """Rank r of w: a contiguous block of whole batches (each index once, no padding), or its slice of every
    global batch."""
    from torch.utils.data import BatchSampler, SequentialSampler

    batches = BatchSampler(SequentialSampler(range(11)), 3, drop_last=False)  # 4 batches, the last of 2
    seen, slices = [], []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        monkeypatch.setattr(distributed, "world_size", lambda: 3)
        seen.append(list(distributed.ShardedBatches(batches)))
        slices.append(list(distributed.SplitBatches([[0, 1, 2, 3, 4, 5, 6], [7, 8, 9, 10, 11, 12, 13]])))
    assert seen == [[[0, 1, 2], [3, 4, 5]], [[6, 7, 8]], [[9, 10]]]
    assert slices == [[[0, 1, 2], [7, 8, 9]], [[3, 4], [10, 11]], [[5, 6], [12, 13]]]


def test_real_labels_follow_each_process_s_images(monkeypatch):
    """ReaL sets are looked up by each process's image positions and the counts added up."""
    from posthoc.evaluate import _RealAccuracy

    labels = [[0], [1], [], [2], [0, 1]]
    probs = torch.eye(3)[[0, 2, 1, 2, 1]] * 0.9 + 0.05  # predictions 0, 2, 1, 2, 1
    whole = _RealAccuracy(labels)
    whole.update(probs)
    parts = [_RealAccuracy(labels, order) for order in ([0, 1, 2], [3, 4])]
    parts[0].update(probs[:3])
    parts[1].update(probs[3:])
    counts = [(p.position, p.hits1, p.hits5, p.counted) for p in parts]
    monkeypatch.setattr(distributed, "all_gather", lambda obj: counts)
    parts[0].reduce()
    assert parts[0].compute() == whole.compute() == (75.0, 100.0, 4)


# ------------------------------------------------------------------------------------ two processes
PRIMITIVES = textwrap.dedent(
    """
    import json, sys
    import torch
    from torch.utils.data import BatchSampler, SequentialSampler
    from posthoc import distributed
    from posthoc.errors import PosthocError
    from posthoc.methods.noisy import Child, ChildScorer, Mutator, mutable_tensors
    from tests.helpers import tiny_model

    def body():
        r = distributed.rank()
        out = {"rank": r, "world": distributed.world_size()}
        out["map"] = distributed.map_shards(lambda x: [x, distributed.rank()], list(range(5)))
        out["main_only"] = distributed.map_shards(lambda x: x * x, [1, 2, 3], main_only=True)
        mine = list(distributed.ShardedBatches(BatchSampler(SequentialSampler(range(3)), 4, False)))  # rank 1: nothing
        local = torch.tensor([i for b in mine for i in b], dtype=torch.float64)[:, None] if mine else None
        out["gathered"] = distributed.gather_tensors(local).flatten().tolist()
        out["sum"] = distributed.sum_across(r + 1)
        try:
            distributed.raise_any(PosthocError("rank 1 saw a bad image; replace it") if r == 1 else None)
        except PosthocError as e:
            out["agreed"] = [str(e), e.rank]
        model = tiny_model("test_resnet")
        names = mutable_tensors(model)
        x = torch.randn(10, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        scorer = ChildScorer(model, names, x, torch.zeros(10, dtype=torch.long), torch.device("cpu"), batch=4)
        child = Mutator(model, names, 0.5, "absolute", seed=0).child(Child(0, 1, False), 0.01)
        out["kl_logits_equal"] = torch.equal(scorer.logits(child, shard=True), scorer.logits(child))
        print("RESULT " + json.dumps(out))
        return 0

    sys.exit(distributed.run(body, report=lambda line: print("error:", line, file=sys.stderr)))
    """
)


def test_primitives_on_two_processes():
    runs = launch([["-c", PRIMITIVES]] * 2, cwd=Path(__file__).resolve().parents[1])
    assert_ok(*runs)
    results = [json.loads(r.stdout.split("RESULT ", 1)[1]) for r in runs]
    for res in results:
        assert res["world"] == 2
        assert res["map"] == [[0, 0], [1, 0], [2, 0], [3, 1], [4, 1]]  # blocks, in order, on both
        assert res["gathered"] == [0.0, 1.0, 2.0]  # rank 1 had no batch at all
        assert res["sum"] == 3.0
        assert res["agreed"] == ["rank 1 saw a bad image; replace it", 1]
        assert res["kl_logits_equal"] is True  # sharded batches give the very same logits
    assert results[0]["main_only"] == [1, 4, 9] and results[1]["main_only"] is None


def test_eval_on_two_processes_equals_one_process_exactly(tmp_path, inputs):
    """An odd number of batches (63 images, batch 5: 13 batches, 7 on rank 0 and 6 on rank 1), a plain
    model and an ensemble: every metric and every reliability bin equal, bit for bit."""
    ens = tmp_path / "ens"
    assert main(["ensemble", str(inputs["resnet"]), str(inputs["resnet1"]), "--out", str(ens)]) == 0
    args = ["eval", str(inputs["resnet"]), str(ens), "--data", str(inputs["data"]), "--workers", "0", "--batch-size", "5"]
    args += ["--no-progress", "--sort", "top1"]
    two = posthoc_on_two([*args, "--results-file", str(tmp_path / "two.json")])
    one = posthoc_on_one([*args, "--results-file", str(tmp_path / "one.json")])
    assert_ok(*two, one)
    rows = [json.loads((tmp_path / f"{n}.json").read_text()) for n in ("two", "one")]
    for row in (r for rs in rows for r in rs):
        row.pop("throughput")
    assert rows[0] == rows[1]
    by_model = {r["model"]: r for r in rows[0]}
    assert by_model[str(ens)]["members"] == 2 and {r["images"] for r in rows[0]} == {63}
    assert two[1].stdout == "" and two[1].stderr == ""  # rank 1 prints nothing
    assert "2 models on val" in two[0].stdout


def test_noisy_on_two_processes_writes_the_same_artifact(tmp_path, inputs):
    """Children split between the processes, each scoring its share on the whole select part: the same
    artifact, byte for byte, as one process."""
    args = ["boost", str(inputs["resnet"]), "--method", "noisy", "--data", str(inputs["data"]), "--workers", "0"]
    args += ["--population", "6", "--members", "4", "--kl-samples", "30", "--bn-batches", "2", "--seed", "3"]
    args += ["--no-progress", "--out", "art"]
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = posthoc_on_two(args, cwd=tmp_path / "two")
    one = posthoc_on_one(args, cwd=tmp_path / "one")
    assert_ok(*two, one)
    assert_same_artifact(tmp_path / "two" / "art", tmp_path / "one" / "art")
    assert "writing art" in two[0].stdout and two[1].stdout == ""


def _weights(artifact: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_file(str(artifact / "model.safetensors")).items() if v.is_floating_point()}


@pytest.mark.parametrize("optimizer", [["--optimizer", "sgd", "--lr", "0.05"], []])
def test_resample_on_two_processes_is_reproducible_and_matches_one_process(tmp_path, inputs, optimizer):
    """DistributedDataParallel on 2 x 8 images per step: the same bytes on a rerun, and the same global
    batches as one process on 16 (a BatchNorm-free model, so only the order of float sums differs); with
    SGD, and with the AdamW the rule gives the ViT."""
    args = ["boost", str(inputs["vit"]), "--method", "resample", "--data", str(inputs["data"]), "--workers", "0"]
    args += ["--epochs", "1", "--members", "2", "--include-mean", "--augment", "none", "--no-progress", *optimizer]
    first = posthoc_on_two([*args, "--batch-size", "8", "--out", str(tmp_path / "a")])
    again = posthoc_on_two([*args, "--batch-size", "8", "--out", str(tmp_path / "b")])
    one = posthoc_on_one([*args, "--batch-size", "16", "--out", str(tmp_path / "one")])
    assert_ok(*first, *again, one)
    assert "global batch 16 (2 processes x 8)" in first[0].stdout
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    two, single, parent = (
        _weights(tmp_path / "a"),
        _weights(tmp_path / "one"),
        load_file(str(inputs["vit"] / "model.safetensors")),
    )
    moved = sum(float((single[k][0] - parent[k.split(".", 3)[-1]].double()).pow(2).sum()) for k in single if ".members." in k)
    differ = sum(float((two[k] - single[k]).pow(2).sum()) for k in single)
    assert moved > 0 and differ**0.5 < 1e-3 * moved**0.5  # within float rounding of the fine-tuning's own step
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["method"]["measured"]["global_batch"] == 16
    assert config["method"]["measured"]["optimizer"]["optimizer"] == ("sgd" if optimizer else "adamw")


@pytest.mark.parametrize("method", ["sparse", "lastlayer", "sparse-trajectory"])
def test_split_children_and_sharded_caches_give_the_same_artifact(tmp_path, inputs, method):
    """sparse tunes one child per process; lastlayer caches its training inputs on both and retrains on
    rank 0; a sparse trajectory runs on rank 0 while the other waits: the artifact of one process either way."""
    sparse = ["--members", "2", "--no-include-parent", "--child-epochs", "0.3", "--bn-batches", "2"]
    flags = {
        "sparse": sparse,
        "lastlayer": ["--last-layers", "2", "--epochs-per-layer", "1"],
        "sparse-trajectory": [*sparse, "--schedule", "trajectory"],
    }[method]
    method = method.split("-")[0]
    args = ["boost", str(inputs["resnet"]), "--method", method, *flags, "--batch-size", "16", "--data", str(inputs["data"])]
    args += [*QUIET, "--out", "art"]
    (tmp_path / "two").mkdir()
    (tmp_path / "one").mkdir()
    two = posthoc_on_two(args, cwd=tmp_path / "two")
    one = posthoc_on_one(args, cwd=tmp_path / "one")
    assert_ok(*two, one)
    assert_same_artifact(tmp_path / "two" / "art", tmp_path / "one" / "art")


@pytest.mark.parametrize("failing", [1, 0])
def test_a_failing_process_ends_both_with_one_line_and_no_artifact(tmp_path, inputs, failing):
    """A bad data path on one process only: the other, already working (or waiting in a collective), stops
    too; rank 0 prints one line naming the problem (and the rank), nothing is written."""
    args = ["boost", str(inputs["resnet"]), "--method", "noisy", "--population", "4", "--members", "3"]
    args += ["--kl-samples", "30", *QUIET, "--out", str(tmp_path / "art")]
    good, bad = ["--data", str(inputs["data"])], ["--data", str(tmp_path / "missing")]
    commands = [["-m", "posthoc", *args, *(bad if r == failing else good)] for r in range(2)]
    runs = launch(commands)
    assert [r.returncode for r in runs] == [2, 2]
    lines = [line for line in runs[0].stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: data directory") and "does not exist" in lines[0], runs[0].stderr
    assert lines[0].endswith("(rank 1)") == (failing == 1)
    assert runs[1].stderr == "" and "Traceback" not in runs[0].stderr
    assert not (tmp_path / "art").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".art")]
