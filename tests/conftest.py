"""Shared fixtures. No model hub is reachable: everything runs offline."""
from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# MKL's float32 GEMM on some CPUs (seen on an AVX2 AMD EPYC) computes the last rows of a batch with
# another kernel than the first ones, so two equal rows of one matmul can differ in the last bit; the
# exactness tests compare rows of one pass bit for bit. Strict conditional numerical reproducibility
# makes every row's result independent of its position (set before torch loads MKL).
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

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


# ------------------------------------------------------------------ experiment runs (test_rq1/test_rq2/test_cli)
@pytest.fixture(scope="session")
def planted_rq1(planted_cultural, tmp_path_factory):
    """One RQ1 run on planted-cultural (the pair's own cultural prompt set, first 32 that pass the
    strict filter; no behaviour), shared by test_rq1 (known answers) and test_cli (report).
    Returns (run_dir Path, RQ1Options, pair, seconds)."""
    import time

    from mechdiff.experiments.rq1 import RQ1Options, run_rq1
    from mechdiff.pairs import load_pair

    base, tuned, _ = planted_cultural
    pair = load_pair("planted-cultural")
    opts = RQ1Options(n_prompts=32, behaviour=False)
    out = tmp_path_factory.mktemp("rq1_planted")
    t0 = time.perf_counter()
    run = run_rq1(pair, opts, out=out, models=(base, tuned))
    return run.path, opts, pair, time.perf_counter() - t0


# ------------------------------------------------------------------ tiny pairs on disk (fast stage runs)
@pytest.fixture
def tiny_pair():
    """Factory ``(root, name, seed, prompts) -> pair TOML path``: two tiny random Llamas saved under
    ``root`` (base seed 0, tuned ``seed``), float32, whose prompt set is the JSONL file ``prompts``."""
    def make(root, name: str, seed: int, prompts):
        from mechdiff.models.tiny import tiny_model
        for side, s in (("base", 0), ("tuned", seed)):
            m, tok = tiny_model("llama", seed=s, n_layers=4)
            m.save_pretrained(root / f"{name}-{side}")
            tok.save_pretrained(root / f"{name}-{side}")
        f = root / f"{name}.toml"
        f.write_text(f'name = "{name}"\nbase = "{root / (name + "-base")}"\ntuned = "{root / (name + "-tuned")}"\n'
                     f'dtype = "float32"\n[datasets]\nset = "{prompts}"\n', encoding="utf-8")
        return f
    return make
