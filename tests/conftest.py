"""Shared fixtures: a tiny synthetic dataset in the real Karpathy layout, generated once per test run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(autouse=True)
def _few_threads():
    """Keep tests light on the 2-core machines they run on."""
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory) -> Path:
    """Path of the Karpathy json of a 36-image synthetic dataset (64 px)."""
    from rsitr.data.synth import generate_synthetic

    out = tmp_path_factory.mktemp("synth")
    generate_synthetic(out, num_images=36, image_size=64, seed=3)
    return out / "dataset_synth.json"
