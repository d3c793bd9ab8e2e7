"""``posthoc export``: one ONNX / torch.export file per artifact that equals ``posthoc.load`` (dynamic batch,
combine rule and temperature inside, shared prefix once), preprocessing in its metadata, one-line errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

import posthoc
from posthoc import Combine, Ensemble, PosthocError
from posthoc.cli import main
from posthoc.commands.export import export_artifact

from .helpers import tiny_model
from .test_artifact import head_only_members
from .test_hub import TOKEN, hub  # noqa: F401 (the fake Hub fixture)

BATCHES = (1, 7)  # dynamic batch: one image and an odd count, neither of them the traced example (2)
GRAPHS = ("onnx", "pt2")  # aoti compiles the pt2 program (tens of seconds): tested on one artifact


def coupling_ensemble() -> Ensemble:
    """Three different networks merged by a coupling layer over their concatenated features, at a temperature."""
    models = [tiny_model("test_resnet", seed=s) for s in range(3)]
    weight = torch.cat([m.fc.weight.detach() for m in models], dim=1) / 3
    bias = torch.stack([m.fc.bias.detach() for m in models]).mean(0)
    combine = Combine(rule="coupling", coupling_weight=weight + 0.05, coupling_bias=bias, temperature=1.5)
    return Ensemble.from_models(models, combine=combine)


# One entry per kind of artifact: every test below runs on each (an artifact with test-time views is one
# more entry). The number is how many copies of the trunk's convolutions the exported graph holds.
ARTIFACTS = {
    "one-network": (lambda: Ensemble.from_models([tiny_model("test_resnet")]), 1),
    "head-only": (lambda: Ensemble.from_models(head_only_members(3)), 1),
    "full": (lambda: Ensemble.from_models([tiny_model("test_resnet", seed=s) for s in range(3)]), 3),
    "coupling": (coupling_ensemble, 3),
    "vote": (lambda: Ensemble.from_models(head_only_members(3), combine=Combine(rule="vote")), 1),
    "two-views": (
        lambda: Ensemble.from_models(
            [tiny_model("test_resnet", seed=s) for s in range(2)], combine=Combine(views=("identity", "hflip"))
        ),
        2,
    ),
    "vit-logit-mean": (
        lambda: Ensemble.from_models(
            [tiny_model("test_vit", seed=s) for s in range(2)], combine=Combine(rule="logit_mean", temperature=2.0)
        ),
        2,
    ),
}
RESNET_CONVS = sum(isinstance(m, torch.nn.Conv2d) for m in tiny_model("test_resnet").modules())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Saved artifacts by name, built on first use."""
    root, made = tmp_path_factory.mktemp("artifacts"), {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = posthoc.save(ARTIFACTS[name][0](), root / name)
        return made[name]

    return get


@pytest.fixture(scope="module")
def exported(artifacts, tmp_path_factory):
    """Exports (with per-member outputs) by (artifact, format), written on first use: ``(file, result)``."""
    root, made = tmp_path_factory.mktemp("exports"), {}

    def get(name: str, format: str) -> tuple[Path, dict]:
        if format == "onnx":
            for package in ("onnx", "onnxscript", "onnxruntime"):
                pytest.importorskip(package)
        if (name, format) not in made:
            out = root / name / format / f"model.{format}"
            made[name, format] = out, export_artifact(artifacts(name), out, format, members_output=True)
        return made[name, format]

    return get


def runner(path: Path):
    """A function running the exported file: ONNX Runtime on CPU, or the reloaded ``torch.export`` program."""
    if path.suffix == ".onnx":
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda x: [torch.from_numpy(o) for o in session.run(None, {"images": x.numpy()})]
    program = torch.export.load(str(path)).module()
    return lambda x: list(program(x))


@pytest.mark.parametrize(
    "name, format",
    [(name, "onnx") for name in ARTIFACTS] + [(name, "pt2") for name in ("one-network", "full", "coupling", "two-views")],
)  # pt2 is the program ONNX is converted from: a few artifacts check its saving and loading
def test_export_equals_posthoc_load_at_any_batch(exported, artifacts, name, format):
    out, result = exported(name, format)
    assert result["max_abs_diff"] <= 1e-5 and result["batches"] == [1, 2, 7]
    assert sorted(Path(f).name for f in result["files"]) == ["model.json", f"model.{format}"]
    reference, run = posthoc.load(artifacts(name)), runner(out)
    k = reference.num_members
    for batch in BATCHES:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            probs, members = reference(x, return_members=True)
            got_probs, got_members = run(x)
        assert got_probs.shape == (batch, 3) and got_members.shape == (k, batch, 3)
        assert (got_probs - probs).abs().max() <= 1e-5
        assert (got_members - members).abs().max() <= 1e-5


@pytest.mark.parametrize("name", [n for n in ARTIFACTS if not n.startswith("vit")])
def test_onnx_graph_runs_the_shared_trunk_once_with_batchnorm_folded(exported, name):
    import onnx

    out, _ = exported(name, "onnx")
    graph = onnx.load(str(out)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("Conv") == ARTIFACTS[name][1] * RESNET_CONVS
    assert "BatchNormalization" not in ops  # folded into the convolutions, as posthoc.load does
    batch = graph.input[0].type.tensor_type.shape.dim[0].dim_param
    assert [i.name for i in graph.input] == ["images"] and batch == "batch"
    assert [o.name for o in graph.output] == ["probs", "member_probs"]


def test_preprocessing_travels_in_the_metadata(exported):
    import onnx

    out, _ = exported("one-network", "onnx")
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    sidecar = json.loads(out.with_suffix(".json").read_text())
    for meta in (sidecar["preprocessing"], {k: json.loads(props[k]) for k in sidecar["preprocessing"]}):
        assert meta["input_size"] == [3, 32, 32] and meta["mean"] == [0.5] * 3 and meta["std"] == [0.25] * 3
        assert meta["interpolation"] == "bilinear" and meta["crop_pct"] == 1.0
    assert json.loads(props["pretrained_cfg"])["classifier"] == "fc" and json.loads(props["posthoc"]) == {
        k: v for k, v in sidecar.items() if k != "validation"
    }
    assert sidecar["outputs"] == {"probs": ["batch", 3], "member_probs": [1, "batch", 3]}
    assert (
        sidecar["combine"] == {"rule": "prob_mean", "temperature": 1.0, "views": ["identity"]}
        and sidecar["validation"]["max_abs_diff"] <= 1e-5
    )
    pt2, _ = exported("coupling", "pt2")
    extra = {"posthoc.json": ""}
    torch.export.load(str(pt2), extra_files=extra)
    assert json.loads(extra["posthoc.json"])["preprocessing"]["mean"] == [0.5] * 3


def test_cli_export_checks_its_output_first(artifacts, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    art = artifacts("head-only")
    out = tmp_path / "serve" / "ens.onnx"
    assert main(["export", str(art), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and "max abs difference to posthoc.load" in printed and out.with_suffix(".json").is_file()
    before = out.read_bytes()
    for argv, message in [
        ([str(art), "--out", str(out)], "already exists; pass --overwrite"),
        ([str(art), "--out", str(art / "config.onnx")], "lies inside the input"),
        ([str(art), "--out", str(tmp_path / "m.json")], "is where the metadata JSON goes"),
        ([str(art), "--out", str(tmp_path / "m.onnx"), "--format", "tflite"], "unknown export format 'tflite'"),
        ([str(art), "--out", str(tmp_path / "m.pt2"), "--opset", "18"], "--opset applies to the onnx format only"),
        ([str(tmp_path / "nothing"), "--out", str(tmp_path / "m.onnx")], "does not exist"),
    ]:
        assert main(["export", *argv]) == 2, argv
        err = capsys.readouterr().err
        assert message in " ".join(err.split()) and "Traceback" not in err
    assert out.read_bytes() == before and sorted(p.name for p in art.iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    assert main(["export", str(art), "--out", str(tmp_path / "ens.pt2"), "--no-validate"]) == 0  # format from the suffix
    assert "not validated" in " ".join(capsys.readouterr().out.split())
    assert json.loads((tmp_path / "ens.json").read_text())["format"] == "pt2"


class DataDependent(torch.nn.Module):
    """A layer whose forward branches on tensor values: torch.export cannot trace it."""

    def forward(self, x):
        return x if x.sum() > 0 else -x


@torch.library.custom_op("posthoc_test::double", mutates_args=())
def double(x: torch.Tensor) -> torch.Tensor:
    """An operator with no ONNX translation (torch.export keeps it as it is)."""
    return x * 2


@double.register_fake
def _(x):
    return torch.empty_like(x)


class Doubler(torch.nn.Module):
    def forward(self, x):
        return double(x)


def member_layer_replaced(path: Path, layer: torch.nn.Module):
    """The artifact loaded, with block ``layer1.0``'s activation replaced in every member."""
    module = posthoc.load(path)
    for member in module.executors[0].member_modules():
        member.get_submodule("model.layer1").get_submodule("0").act1 = layer
    return module


@pytest.mark.parametrize("format", GRAPHS)
def test_an_untraceable_layer_fails_with_one_line_naming_it(artifacts, tmp_path, capsys, monkeypatch, format):
    module = member_layer_replaced(artifacts("full"), DataDependent())
    with pytest.raises(PosthocError, match=r"layer 'layer1\.0\.act1' \(DataDependent, member member-0\) does not trace"):
        export_artifact(module, tmp_path / f"m.{format}", format, validate=False)
    monkeypatch.setattr(posthoc.sources, "load_artifact", lambda spec: module)
    assert main(["export", str(artifacts("full")), "--out", str(tmp_path / f"m.{format}"), "--format", format]) == 2
    err = capsys.readouterr().err
    assert "layer1.0.act1" in err and "data-dependent" in err and len(err.strip().splitlines()) <= 3  # one line, wrapped
    assert "Traceback" not in err and "def forward" not in err
    assert list(tmp_path.iterdir()) == []


def test_an_operator_onnx_cannot_take_is_named_with_its_layer(artifacts, tmp_path):
    pytest.importorskip("onnxscript")
    module = member_layer_replaced(artifacts("full"), Doubler())
    with pytest.raises(PosthocError, match=r"operator posthoc_test::double in layer 'layer1\.0\.act1' \(Doubler\) has no ONNX"):
        export_artifact(module, tmp_path / "m.onnx", validate=False)
    assert list(tmp_path.iterdir()) == []
    result = export_artifact(module, tmp_path / "m.pt2")  # torch.export keeps the operator: pt2 takes it
    assert result["max_abs_diff"] <= 1e-5


def test_aoti_package_equals_posthoc_load(artifacts, tmp_path):
    """AOTInductor compiles the traced program for this CPU; the package runs without the model's code."""
    art = artifacts("head-only")
    result = export_artifact(art, tmp_path / "model.pt2", "aoti")
    assert result["max_abs_diff"] <= 1e-5 and json.loads((tmp_path / "model.json").read_text())["format"] == "aoti"
    package, reference = torch._inductor.aoti_load_package(str(tmp_path / "model.pt2")), posthoc.load(art)
    for batch in BATCHES:
        x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            assert (package(x)[0] - reference(x)).abs().max() <= 1e-5


def test_missing_onnx_packages_give_one_line(artifacts, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(PosthocError, match=r"needs onnxscript, which is not installed: pip install 'posthoc\[export\]'"):
        export_artifact(artifacts("one-network"), tmp_path / "m.onnx")
    assert main(["export", str(artifacts("one-network")), "--out", str(tmp_path / "m.onnx")]) == 2
    assert "pip install 'posthoc[export]'" in capsys.readouterr().err and list(tmp_path.iterdir()) == []


def test_a_file_that_disagrees_with_posthoc_load_is_not_written(artifacts, tmp_path, monkeypatch):
    import posthoc.export

    real = posthoc.export._run_exported
    monkeypatch.setattr(
        posthoc.export, "_run_exported", lambda *a: lambda x: [o + 1e-3 for o in real(*a)(x)]
    )  # a graph off by 1e-3
    with pytest.raises(PosthocError, match=r"differs from posthoc.load by 1\.00e-03 .*nothing was written"):
        export_artifact(artifacts("one-network"), tmp_path / "m.pt2")
    assert list(tmp_path.iterdir()) == []  # no file, no temporary directory


def test_push_with_export_uploads_it_and_shows_onnx_runtime_in_the_card(hub, exported, artifacts, capsys, monkeypatch):  # noqa: F811
    out, _ = exported("one-network", "onnx")
    art = artifacts("one-network")
    assert main(["push", str(art), "--repo", "me/tiny", "--token", TOKEN, "--with-export", str(out)]) == 0
    assert [c["files"] for c in hub.commits] == [["README.md", "config.json", "model.json", "model.onnx", "model.safetensors"]]
    files = hub.repos["me/tiny"]["files"]
    assert files["model.onnx"] == out.read_bytes()
    card = files["README.md"].decode()
    assert "Run with ONNX Runtime" in card and 'hf_hub_download("me/tiny", "model.onnx")' in card
    assert "Run with ONNX Runtime" not in (art / "README.md").read_text()  # only where an export is uploaded
    import huggingface_hub
    import numpy as np

    snippet = card.split("Run with ONNX Runtime")[1].split("```python")[1].split("```")[0]
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", lambda repo, filename, **kw: str(out))
    namespace = {"images": np.random.default_rng(0).random((2, 3, 32, 32))}
    exec(snippet, namespace)  # the card's lines run as they are
    assert namespace["probs"].shape == (2, 3) and np.allclose(namespace["probs"].sum(1), 1, atol=1e-5)
    stale, _ = exported("full", "onnx")  # exported from another artifact
    assert main(["push", str(art), "--repo", "me/tiny", "--token", TOKEN, "--with-export", str(stale)]) == 2
    assert "was not exported from" in capsys.readouterr().err and len(hub.commits) == 1
