"""Shared fixtures: tiny real timm models and small generated ImageFolder data, all offline.

The Hugging Face cache is redirected to a temporary directory and the Hub is switched off before
anything imports huggingface_hub, so no test can reach the network.
"""

from __future__ import annotations

import os
import tempfile

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HUB_CACHE"] = tempfile.mkdtemp(prefix="posthoc-hf-cache-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

from pathlib import Path

import pytest
import torch

from .helpers import make_image_folder, save_hub_layout, tiny_model

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def image_data(tmp_path_factory) -> Path:
    """DIR/train (3 x 40 images) and DIR/val (3 x 20 images), 32x32 PNGs of three patterns."""
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": 40, "val": 20})


@pytest.fixture(scope="session")
def resnet_dir(tmp_path_factory) -> Path:
    """A tiny test_resnet (3 classes) saved in timm's Hub layout."""
    return save_hub_layout(tiny_model("test_resnet"), tmp_path_factory.mktemp("resnet"))


@pytest.fixture(scope="session")
def hf_cache() -> Path:
    return Path(os.environ["HF_HUB_CACHE"])
