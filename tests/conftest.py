"""Shared fixtures. No model hub is reachable: everything runs offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402


# ------------------------------------------------------------------ real offline weights (slow-ish)
@pytest.fixture(scope="session")
def smollm2_loaded():
    """The real SmolLM2-135M-Instruct testbed as a LoadedModel (float32, CPU; cached after first use)."""
    from mechdiff.models.load import load_model

    return load_model("smollm2-135m", dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def smollm2(smollm2_loaded):
    """(model, tokenizer) of the real SmolLM2-135M-Instruct, float32 on CPU, eval mode."""
    return smollm2_loaded.model, smollm2_loaded.tokenizer


@pytest.fixture(scope="session")
def planted_cultural():
    """(base LoadedModel, tuned LoadedModel, ground truth dict) of the planted-cultural pair."""
    from mechdiff.models.planted import load_planted

    return load_planted("planted-cultural")


@pytest.fixture(scope="session")
def planted_cognitive():
    """(base LoadedModel, tuned LoadedModel, ground truth dict) of the planted-cognitive pair."""
    from mechdiff.models.planted import load_planted

    return load_planted("planted-cognitive")
