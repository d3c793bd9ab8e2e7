"""Every model source kind, and the errors a user hits loading one."""

from __future__ import annotations

import json
import shutil

import pytest
import timm
import torch
from safetensors.torch import save, save_file

from posthoc import PosthocError, load_model
from posthoc.timm_io import build_from_timm_config, timm_config

from .helpers import fill_hf_cache, save_hub_layout, tiny_model

X = torch.randn(2, 3, 32, 32)


def same_outputs(a, b):
    with torch.no_grad():
        return torch.allclose(a(X), b(X), atol=1e-6)


@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet"])
def test_hub_layout_dir_plain_and_prefixed(tmp_path, name):
    ref = tiny_model(name)
    save_hub_layout(ref, tmp_path / name)
    for spec in (str(tmp_path / name), f"local-dir:{tmp_path / name}"):
        model = load_model(spec)
        assert same_outputs(model, ref)
        assert model.pretrained_cfg["input_size"] == (3, 32, 32)
        assert model.pretrained_cfg["mean"] == (0.5, 0.5, 0.5) or list(model.pretrained_cfg["mean"]) == [0.5] * 3


def test_hub_layout_dir_with_pytorch_model_bin(tmp_path):
    ref = tiny_model("test_resnet")
    save_hub_layout(ref, tmp_path)
    sd = {k: v for k, v in ref.state_dict().items()}
    (tmp_path / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "pytorch_model.bin")
    assert same_outputs(load_model(str(tmp_path)), ref)


def test_timm_name_with_tag_from_offline_cache():
    torch.manual_seed(3)
    ref = timm.create_model("test_resnet").eval()
    fill_hf_cache("timm/test_resnet.r160_in1k", {"model.safetensors": save(ref.state_dict())})
    for spec in ("test_resnet.r160_in1k", "test_resnet"):  # default tag resolves to the same weights
        model = load_model(spec)
        assert same_outputs(model, ref)
        assert model.pretrained_cfg["input_size"] == (3, 160, 160)


def test_hf_hub_repo_from_offline_cache():
    ref = tiny_model("test_vit", seed=4)
    config = timm_config(ref)
    fill_hf_cache(
        "someone/tiny-vit",
        {"config.json": json.dumps(config).encode(), "model.safetensors": save(ref.state_dict())},
    )
    model = load_model("hf-hub:someone/tiny-vit")
    assert same_outputs(model, ref)
    assert model.num_classes == 3


def test_hub_repo_missing_from_offline_cache_is_one_line():
    with pytest.raises(PosthocError, match="not in the local Hugging Face cache"):
        load_model("hf-hub:nobody/not-cached")


@pytest.mark.parametrize("wrapper", ["plain", "state_dict", "model", "module"])
@pytest.mark.parametrize("suffix", [".pth", ".pt", ".bin"])
def test_pickled_weights_files_with_wrappers(tmp_path, wrapper, suffix):
    ref = tiny_model("test_resnet", num_classes=1000)
    sd = ref.state_dict()
    obj = {
        "plain": sd,
        "state_dict": {"state_dict": sd, "epoch": 3},
        "model": {"model": sd},
        "module": {f"module.{k}": v for k, v in sd.items()},
    }[wrapper]
    path = tmp_path / f"w{suffix}"
    torch.save(obj, path)
    model = load_model(str(path), arch="test_resnet")
    assert same_outputs(model, ref)


def test_safetensors_weights_file_infers_class_count(tmp_path):
    ref = tiny_model("test_resnet", num_classes=7)
    save_file(ref.state_dict(), tmp_path / "w.safetensors")
    model = load_model(str(tmp_path / "w.safetensors"), arch="test_resnet")
    assert model.num_classes == 7
    assert same_outputs(model, ref)


def test_num_classes_reheads_only_the_classifier(resnet_dir):
    base = load_model(str(resnet_dir))
    model = load_model(str(resnet_dir), num_classes=5)
    assert model.num_classes == 5 and model(X).shape == (2, 5)
    assert model.pretrained_cfg["num_classes"] == 5
    assert torch.equal(model.conv1[0].weight, base.conv1[0].weight)


def test_timm_config_round_trip(resnet_dir):
    model = load_model(str(resnet_dir))
    rebuilt = build_from_timm_config(timm_config(model))
    rebuilt.load_state_dict(model.state_dict())
    assert same_outputs(rebuilt.eval(), model)


def test_pickle_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    torch.save({"state_dict": Evil()}, tmp_path / "evil.pth")
    with pytest.raises(PosthocError, match="cannot read weights file"):
        load_model(str(tmp_path / "evil.pth"), arch="test_resnet")


# ------------------------------------------------------------------------------------------ errors
def test_unknown_model_suggests_close_names():
    with pytest.raises(PosthocError, match="unknown model 'resnet5O'.*did you mean.*resnet50"):
        load_model("resnet5O")


def test_unknown_pretrained_tag():
    with pytest.raises(PosthocError, match="unknown pretrained tag 'nope'.*test_resnet.r160_in1k"):
        load_model("test_resnet.nope")


def test_missing_weights_file(tmp_path):
    with pytest.raises(PosthocError, match="does not exist"):
        load_model(str(tmp_path / "absent.safetensors"), arch="test_resnet")


def test_weights_file_needs_arch(tmp_path):
    save_file(tiny_model().state_dict(), tmp_path / "w.safetensors")
    with pytest.raises(PosthocError, match="also pass --arch"):
        load_model(str(tmp_path / "w.safetensors"))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_weights_file(tmp_path, damage):
    path = tmp_path / "w.safetensors"
    save_file(tiny_model().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00garbage" * 10)
    with pytest.raises(PosthocError, match="cannot read weights file .*corrupt"):
        load_model(str(path), arch="test_resnet")


def test_weights_that_do_not_fit_name_the_keys(tmp_path):
    save_file(tiny_model("test_vit").state_dict(), tmp_path / "vit.safetensors")
    with pytest.raises(
        PosthocError, match=r"do not fit architecture 'test_resnet': .*missing conv1\.0\.weight.*unexpected blocks"
    ):
        load_model(str(tmp_path / "vit.safetensors"), arch="test_resnet")


def test_shape_mismatch_is_named(tmp_path, resnet_dir):
    shutil.copytree(resnet_dir, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    cfg["model_args"]["in_chans"] = 1
    (tmp_path / "m" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PosthocError, match=r"shape mismatch in conv1\.0\.weight"):
        load_model(str(tmp_path / "m"))


def test_directory_without_config(tmp_path):
    with pytest.raises(PosthocError, match="has no config.json"):
        load_model(str(tmp_path))


def test_directory_without_weights(tmp_path, resnet_dir):
    shutil.copy(resnet_dir / "config.json", tmp_path / "config.json")
    with pytest.raises(PosthocError, match="has no weights file"):
        load_model(str(tmp_path))


def test_path_like_name_that_does_not_exist(tmp_path):
    with pytest.raises(PosthocError, match="neither an existing path nor a timm name"):
        load_model(str(tmp_path / "nothing" / "here"))


def test_every_subpackage_is_packaged():
    """pyproject lists packages by hand (model_cards is mapped in); a missing one breaks installs."""
    from pathlib import Path

    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    root = Path(__file__).resolve().parents[1]
    listed = set(tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(root).parts) for p in (root / "posthoc").rglob("__init__.py")}
    assert found <= listed, sorted(found - listed)
