"""RQ1 on the two trained LoRA pairs (issue 12): offline, CI-sized, known facts only.

The shipped adapters (mechdiff/finetune/adapters/, cards in card.json) are LoRA rank 8 on every
projection of all 30 layers of SmolLM2-135M-Instruct, so neither pair has an exact ground truth the
way the planted pairs do; what is known for certain:

  * smollm2-culture-lora extends the tokenizer by 45 Kazakh tokens (trained embedding rows): the
    fairness step must report vocab_b = vocab_a + 45, a positive % increase, and a shared vocabulary
    smaller than the tuned vocabulary (the new tokens are not shared);
  * smollm2-math-lora keeps the base tokenizer exactly (same size, nothing lost to the filter);
  * neither fine-tune is a no-op: patching the other model's residual changes the next-token
    distribution at some layer (KL > 0), the states are not linearly identical at some layer
    (debiased CKA < 1), and RQ1 names the layer where the divergence enters.

Each pair runs RQ1 once (12 prompts of the pair's own target set, every layer patched in both
directions at the decision token only, no behaviour table, 4 null permutations) in a module fixture;
the base side is the session's SmolLM2 (loaded once for both pairs).
"""
from __future__ import annotations

import json

import pytest

from mechdiff.finetune import ADAPTERS

N_PROMPTS, N_LAYERS, N_NEW = 12, 30, 45
MATH, CULTURE = "smollm2-math-lora", "smollm2-culture-lora"


def _read(path, name):
    return json.loads((path / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def lora_rq1(smollm2_loaded, tmp_path_factory):
    """{pair name: the RQ1 artifacts} for both LoRA pairs; each tuned model is loaded once and freed
    after its run, the base is shared (the session fixture)."""
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1
    from mechdiff.models.load import load_model
    from mechdiff.pairs import load_pair

    out = {}
    for name in (MATH, CULTURE):
        pair = load_pair(name)
        tuned = load_model(pair.tuned, dtype="float32", device="cpu")
        opts = RQ1Options(n_prompts=N_PROMPTS, behaviour=False, n_perm=4, readouts=["decision"])
        run = run_rq1(pair, opts, out=tmp_path_factory.mktemp(f"rq1_{name}"), models=(smollm2_loaded, tuned))
        out[name] = {"path": run.path, **{k: _read(run.path, f"{k}.json")
                                          for k in ("rq1", "cka", "patch", "fairness")}}
        del tuned
    return out


def test_both_adapters_are_covered():
    assert set(ADAPTERS) == {MATH, CULTURE}


@pytest.mark.real
def test_culture_pair_extended_tokenizer_is_reported_by_the_fairness_step(lora_rq1):
    f = lora_rq1[CULTURE]["fairness"]
    v = f["vocab"]
    assert v["vocab_b"] == v["vocab_a"] + N_NEW, v
    assert v["pct_increase"] == pytest.approx(100.0 * N_NEW / v["vocab_a"]) and v["pct_increase"] > 0
    assert v["shared"] < v["vocab_b"] and v["shared"] <= v["vocab_a"], v
    assert v["shared_pct_of_b"] < 100.0
    # the strict filter drops the prompts the new tokens tokenise differently, yet enough survive
    assert f["filter"]["kept"] < f["filter"]["total"] and f["n_used"] == N_PROMPTS
    head = lora_rq1[CULTURE]["rq1"]["headline"]
    assert head["vocab base / tuned"] == f"{v['vocab_a']} / {v['vocab_b']}"
    assert head["vocab increase %"] > 0


@pytest.mark.real
def test_math_pair_shares_the_base_tokenizer_exactly(lora_rq1):
    f = lora_rq1[MATH]["fairness"]
    v = f["vocab"]
    assert v["vocab_a"] == v["vocab_b"] and v["pct_increase"] == 0.0, v
    assert v["shared_pct_of_a"] == v["shared_pct_of_b"]
    assert f["filter"]["kept"] == f["filter"]["total"], f["filter"]     # nothing lost to the filter
    assert f["filter"]["mean_ratio_a"] == f["filter"]["mean_ratio_b"] == 1.0
    assert f["n_used"] == N_PROMPTS


@pytest.mark.real
@pytest.mark.parametrize("name", [MATH, CULTURE])
def test_neither_pair_is_a_no_op(lora_rq1, name):
    r = lora_rq1[name]
    patch, cka, rq1 = r["patch"], r["cka"], r["rq1"]
    assert patch["layers"] == list(range(N_LAYERS))
    assert patch["clean_cross_kl_shared"]["mean"] > 0.01
    for d, v in patch["directions"].items():
        assert max(row["mean"] for row in v["masked"]) > 0.01, d       # patch KL > 0 at some layer
        assert v["floor"]["max"] < 1e-5, (d, v["floor"])                 # self-patch stays a no-op
    rows = cka["per_layer"]
    assert cka["n"] == N_PROMPTS and rows
    assert min(row["debiased"] for row in rows) < 0.99, rows             # CKA < 1 somewhere
    assert all(row["ci_low"] <= row["debiased"] <= row["ci_high"] for row in rows if row["ci_low"] is not None)
    layers = rq1["layers"]
    assert layers["entry"] is not None and 0 <= layers["entry"] < N_LAYERS, layers
    assert layers["entry"] in layers["chosen"]
    assert "enters at" in " ".join(rq1["headline"])
    ev = {row["layer"]: row for row in layers["evidence"]["per_layer"]}
    assert ev[layers["entry"]]["lower"] > layers["evidence"]["floor"]  # above the floor by the stated margin
