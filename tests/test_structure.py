"""The package's shape: imports point one way, each loop exists once, the CLI only parses and prints,
and the refactoring of 0.2 changed no artifact (SHA-256 of small runs recorded on 0.1)."""

from __future__ import annotations

import ast
import hashlib
import re
from pathlib import Path

import pytest
import torch

from posthoc.cli import main

from .helpers import QUIET, make_image_folder, save_hub_layout, tiny_model

PACKAGE = Path(__file__).resolve().parents[1] / "posthoc"


def _module(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")


def import_graph() -> dict[str, set[str]]:
    """Module -> posthoc modules it imports (anywhere in the file, function-level imports included); a package
    is its ``__init__``, so importing a package is an edge to it and its own imports are edges from it."""
    files = list(PACKAGE.rglob("*.py"))
    names = {_module(f) for f in files}
    graph = {}
    for f in files:
        name = _module(f)
        base = name.split(".") + (["__init__"] if f.name == "__init__.py" else [])
        deps = set()
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.ImportFrom):
                mod = (
                    ".".join(base[: len(base) - node.level] + ([node.module] if node.module else []))
                    if node.level
                    else (node.module or "")
                )
                deps |= {f"{mod}.{a.name}" if f"{mod}.{a.name}" in names else mod for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in names and d != name}
    return graph


def reaches(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), list(graph[start])
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph.get(m, ())
    return seen


def test_no_module_imports_one_that_imports_it_back():
    graph = import_graph()
    loops = sorted(m for m in graph if m in reaches(graph, m))
    assert not loops, f"modules in an import loop: {loops}"


def test_the_cycle_check_can_fail():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert reaches(graph, "a") >= {"a"} and "d" not in reaches(graph, "a")


@pytest.mark.parametrize(
    "module",
    [
        "posthoc.errors",
        "posthoc.distributed",
        "posthoc.metrics",
        "posthoc.runtime",
        "posthoc.timm_io",
        "posthoc.hub",
        "posthoc.graph",
    ],
)
def test_bottom_modules_know_nothing_above_them(module):
    graph = import_graph()
    above = {"posthoc.sources", "posthoc.artifact", "posthoc.fused", "posthoc.ensemble", "posthoc.pipeline", "posthoc.cli"}
    above |= {"posthoc.evaluate", "posthoc.training"} | {m for m in graph if m.startswith("posthoc.commands")}
    assert not (reaches(graph, module) & above)


def _calls(pattern: str) -> dict[str, int]:
    found = {}
    for f in PACKAGE.rglob("*.py"):
        n = len(re.findall(pattern, f.read_text()))
        if n:
            found[_module(f)] = n
    return found


def test_each_loop_exists_once():
    assert _calls(r"\.backward\(") == {"posthoc.training": 2}  # the training loop (with and without a grad scaler)
    assert set(_calls(r"update_bn\(|reset_running_stats\(")) == {"posthoc.training"}
    assert set(_calls(r"def (cache_outputs|run_cached|materialize)\b")) == {"posthoc.training"}
    assert set(_calls(r"1_000_003")) == {"posthoc.runtime"}


def test_cli_only_parses_and_prints():
    source = (PACKAGE / "cli.py").read_text()
    assert "import torch" not in source and "for x, y in" not in source and ".to(" not in source
    assert len(source.splitlines()) < 400
    assert source.count("typer.Option(") <= 5  # the rest is generated from the declared option groups


def test_one_pipeline_prepares_every_command():
    """Models and data are opened, and outputs checked, in one place: no command repeats the preamble."""
    opens_data = {"posthoc.data", "posthoc.pipeline", "posthoc.commands.demo"}  # the demo writes and trains on its own digits
    assert set(_calls(r"\bopen_split\(")) <= opens_data
    assert set(_calls(r"resolve_data_config\(")) <= opens_data | {"posthoc.commands.export"}  # an export records it
    assert set(_calls(r"\bcheck_output\(|ensure_writable\(")) <= {"posthoc.artifact", "posthoc.paths", "posthoc.pipeline"}
    assert set(_calls(r"def check_label_space|classes but the data has")) == {"posthoc.labels"}


# ---------------------------------------------------------------------------- bit-identical artifacts
# SHA-256 of model.safetensors from posthoc 0.1 (commit c0c4090, before the restructuring), on
# torch 2.14.1 with the CPU capability below; the same runs must give the same bytes. Flags use the
# new spellings with the same effective settings (--members counts the parent; --last-layers counts
# the classifier as layer 1; the mean model alone is --members 1 --include-mean).
RECORDED_ON = ("2.14.1", "AVX2")
RUNS = {
    "noisy": (
        ["--method", "noisy", "--population", "4", "--members", "3", "--kl-samples", "30", "--bn-batches", "2", "--seed", "3"],
        "1027cf605201804320253ee097e8909a6adb344f7d9af44b0c0fc286543fd94b",
    ),
    "noisy_scope": (
        [
            "--method",
            "noisy",
            "--population",
            "4",
            "--members",
            "2",
            "--kl-samples",
            "30",
            "--bn-batches",
            "2",
            "--last-layers",
            "2",
            "--no-include-parent",
        ],
        "3d22d770295e5f4f87bd04ca6dbdab222737c478328c78702716d0b7a60302b6",
    ),
    "resample": (
        [
            "--method",
            "resample",
            "--epochs",
            "0.5",
            "--members",
            "2",
            "--no-include-mean",
            "--bn-batches",
            "2",
            "--batch-size",
            "16",
            "--seed",
            "1",
        ],
        "10c22816c4a6adf4d5306662139f95c06e15fd267798d56c3b1c9aabed423cf9",
    ),
    "resample_mean": (
        [
            "--method",
            "resample",
            "--epochs",
            "0.5",
            "--members",
            "1",
            "--include-mean",
            "--bn-batches",
            "2",
            "--batch-size",
            "16",
        ],
        "a11ab55304718491d74dcf143fd4ce6bc6cc7aecff56ea5db0f985565ca2c71a",
    ),
    "lastlayer": (
        ["--method", "lastlayer", "--last-layers", "2", "--epochs-per-layer", "1", "--batch-size", "16", "--temperature-scaling"],
        "8c7ce67fa10f1ee211d3f559d60fc03ab52a0452589d44ef81df9e580d3a4d21",
    ),
    "supernet_copies": (
        ["--method", "supernet", "--copies", "2", "--epochs-per-layer", "1", "--coupling-epochs", "2", "--batch-size", "16"],
        "d19be23f169319b4d24446cac853b01f397ffcb1aba8a4721bad77fdf7dc7c33",
    ),
    "supernet_two": (
        ["--method", "supernet", "--coupling-epochs", "2", "--batch-size", "16"],
        "3d8ef540a2e7e0016df7f8fd90ea768f8dad32b27d32737ef45b3ea7c2dcf65d",
    ),
    "ensemble": ([], "505b2fb17671cd71214d096ed8f3bf0526991114463127ad7c9147d23ea75b05"),
}


@pytest.fixture(scope="module")
def reference_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("reference")
    data = make_image_folder(tmp / "data", {"train": 40, "val": 20})
    return (
        data,
        save_hub_layout(tiny_model("test_resnet", seed=0), tmp / "r0"),
        save_hub_layout(tiny_model("test_resnet", seed=1), tmp / "r1"),
    )


@pytest.mark.parametrize("name", list(RUNS))
def test_artifacts_are_bit_identical_to_posthoc_0_1(name, tmp_path, reference_inputs):
    data, r0, r1 = reference_inputs
    flags, recorded = RUNS[name]
    out = tmp_path / name
    if name == "ensemble":
        args = ["ensemble", str(r0), str(r1), "--out", str(out)]
    else:
        parents = [str(r0), str(r1)] if name == "supernet_two" else [str(r0)]
        args = ["boost", *parents, *flags, "--data", str(data), *QUIET, "--out", str(out)]
    assert main(args) == 0
    digest = hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()
    here = (torch.__version__.split("+")[0], torch.backends.cpu.get_cpu_capability())
    if here != RECORDED_ON:  # float kernels differ across torch versions and CPU instruction sets
        pytest.skip(f"hashes were recorded on torch {RECORDED_ON[0]} / {RECORDED_ON[1]}, this is {here[0]} / {here[1]}")
    assert digest == recorded
