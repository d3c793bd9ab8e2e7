"""The optimizer rule every fine-tune shares (``posthoc.training.fine_tune_recipe``), and every method on
timm's LayerNorm families: a tiny ViT and a tiny ConvNeXt, trained first so that a blind rate can hurt them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from posthoc.artifact import read
from posthoc.command_options import DistillConfig
from posthoc.methods.lastlayer import LastLayerConfig
from posthoc.methods.resample import ResampleConfig
from posthoc.methods.sparse import SparseConfig
from posthoc.methods.supernet import SuperNetConfig
from posthoc.options import describe_options
from posthoc.training import (
    FINE_TUNE_RATES,
    Recipe,
    cycle,
    fine_tune_optimizer,
    fine_tune_recipe,
    optimizer_family,
    train_steps,
)

from .helpers import TINY, run_boost, save_hub_layout, tiny_model

FAMILIES = ("test_vit", "test_convnext")


def test_the_rule_gives_batchnorm_networks_sgd_and_the_others_adamw():
    assert optimizer_family(tiny_model("test_resnet"))[0] == "sgd"
    for name in FAMILIES:
        assert optimizer_family(tiny_model(name))[0] == "adamw", name
    assert optimizer_family(tiny_model("test_vit"), "sgd") == ("sgd", "--optimizer sgd")
    rates = FINE_TUNE_RATES["sparse"]
    assert fine_tune_recipe(tiny_model("test_resnet"), rates) == Recipe("sgd", 0.05, 5e-4, "auto: a BatchNorm network gets SGD")
    vit = fine_tune_recipe(tiny_model("test_vit"), rates)
    assert (vit.optimizer, vit.lr, vit.weight_decay) == ("adamw", rates.adamw_lr, 0.05)
    given = fine_tune_recipe(tiny_model("test_vit"), rates, "adamw", lr=1e-3, weight_decay=0.0)
    assert (given.lr, given.weight_decay) == (1e-3, 0.0)


def test_adamw_decays_matrices_only_and_keeps_its_betas():
    model = tiny_model("test_vit")
    opt, sched = fine_tune_optimizer(model, 10, Recipe("adamw", 1e-3, 0.05, "test"), schedule="onecycle")
    assert isinstance(opt, torch.optim.AdamW)
    no_decay, decay = opt.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    skipped = {names[id(p)] for p in no_decay["params"]}
    assert no_decay["weight_decay"] == 0 and decay["weight_decay"] == 0.05
    assert {"pos_embed", "cls_token", "norm.weight", "head.bias"} <= skipped
    assert all(p.ndim > 1 for p in decay["params"]) and len(skipped) + len(decay["params"]) == len(names)
    for _ in range(5):
        opt.step()
        sched.step()
    assert decay["betas"] == (0.9, 0.999)  # one-cycle cycles the rate only


def test_every_fine_tune_states_its_family_defaults_in_its_help():
    def helps(cls):
        return {o["name"]: o["help"] for o in describe_options(cls)}

    assert FINE_TUNE_RATES["distill"].describe("lr") in helps(DistillConfig)["max_lr"]
    assert FINE_TUNE_RATES["distill"].describe("weight_decay") in helps(DistillConfig)["weight_decay"]
    for cls, key, field in (
        (SparseConfig, "sparse", "max_lr"),
        (ResampleConfig, "resample", "lr"),
        (LastLayerConfig, "lastlayer", "lr"),
        (SuperNetConfig, "supernet", "lr"),
    ):
        assert FINE_TUNE_RATES[key].describe("lr") in helps(cls)[field], cls
        assert cls.rates is FINE_TUNE_RATES[key] if hasattr(cls, "rates") else True


# ------------------------------------------------------------------------------------ every method, two families
def _trained(name: str, data: Path) -> torch.nn.Module:
    """A tiny network of ``name`` trained on the generated images (AdamW one-cycle, 8 epochs), so that its
    select NLL is well below chance and a fine-tune at a wrong rate shows."""
    from posthoc.data import make_loader, open_split, resolve_data_config, train_transform

    model = tiny_model(name)
    train = open_split(data, "train", train_transform(resolve_data_config(model), "light"))
    loader = make_loader(train, 16, shuffle=True, workers=0, seed=0, drop_last=True)
    steps = 8 * len(loader)
    opt, sched = fine_tune_optimizer(model, steps, Recipe("adamw", 2e-3, 0.05, "parent"), pct_start=0.2, div_factor=25)
    model.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        train_steps(model, cycle(loader, steps), opt, steps=steps, scheduler=sched)
    return model.eval()


@pytest.fixture(scope="module")
def family_parents(tmp_path_factory, image_data) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("families")
    return {name: save_hub_layout(_trained(name, image_data), root / name) for name in FAMILIES}


@pytest.mark.parametrize("method", list(TINY))
@pytest.mark.parametrize("family", FAMILIES)
def test_every_method_keeps_a_layernorm_network_finite_and_no_worse(tmp_path, family_parents, image_data, family, method):
    summary = run_boost(family_parents[family], method, image_data, tmp_path / "a")
    ens, _ = read(tmp_path / "a")
    for group in ens.groups:  # every member finite, and every other stored tensor (a coupling layer)
        for k in range(group.num_members):
            assert all(torch.isfinite(t).all() for t in group.member_state_dict(k).values() if t.is_floating_point())
    stored = load_file(str(tmp_path / "a" / "model.safetensors"))
    assert all(torch.isfinite(t).all() for t in stored.values() if t.is_floating_point())
    metrics = json.loads((tmp_path / "a" / "config.json").read_text())["metrics"]
    assert metrics["val:select"]["nll"] <= metrics["parent on val:select"]["nll"], (summary["notes"].get("optimizer"), metrics)
    if method != "noisy":  # noisy trains nothing
        assert summary["notes"]["optimizer"]["optimizer"] == "adamw"


def test_a_one_cycle_whose_warm_up_is_one_step():
    """torch's OneCycleLR divides by zero when pct_start x steps is 1 (10 steps at 0.1): the warm-up is one step."""
    for optimizer in ("sgd", "adamw"):
        opt, sched = fine_tune_optimizer(tiny_model("test_resnet"), 10, Recipe(optimizer, 0.1, 0.0, "test"), pct_start=0.1)
        rates = []
        for _ in range(10):
            rates.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert rates[0] == pytest.approx(0.1 / 100) and max(rates) > 0.09 and rates[1:] == sorted(rates[1:], reverse=True)
