"""Changed heads on the trained known-answer ladder (issue 24): the heads stage's count against the card.

* ``smollm2-math-attn-4`` (LoRA on q/k/v/o of layers 12, 16, 20, 24 only): over layers 11, 12, 24 and 25
  (36 heads, the 18 of 12 and 24 changed; 11 lies below every change, 25 above, its input changed),
  the ``own`` measure (the other model's head on this input) ranks the changed heads first (AUROC >= 0.9),
  the Benjamini-Hochberg count at the declared FDR calls no head outside the four layers, and the
  estimated share stands in rq4.json beside the true one. Measured (4 prompts of the pair's math set,
  top-token log-prob at the decision token): every one of the 18 changed heads moves the readout by
  5e-3 to 8e-2 nats against a noise floor of 1.8e-5, so the count is exactly 18 of 36 here (and 60 of
  270 on planted-cognitive over all 30 layers: benchmarks/bench_head_counts.py). No changed head's
  weight change is too small to move this readout.
* ``smollm2-culture-l20-r4`` (layer 20's MLP down-projection only): no head's own computation changed
  (``own`` exactly 0 everywhere, none counted), while the heads of layer 21, whose input the MLP
  changed, move the readout when swapped (``swap``, reported beside, input-driven).

Each pair's stage runs once (module fixtures) on the session's base model, one tuned model at a time.
"""
from __future__ import annotations

import pytest

from mechdiff.finetune import load_truth

MATH, CULTURE = "smollm2-math-attn-4", "smollm2-culture-l20-r4"
MATH_LAYERS, CULTURE_LAYERS = [11, 12, 24, 25], [20, 21]


def _heads_run(base, name, layers, swaps, n_prompts, tmp):
    from mechdiff.experiments import run_stage
    from mechdiff.models.load import load_model
    from mechdiff.pairs import load_pair

    pair = load_pair(name)
    tuned = load_model(pair.tuned, dtype="float32", device="cpu")
    run = run_stage("heads", pair, out=tmp, models=(base, tuned), layers=layers, n_prompts=n_prompts,
                    ablations=["zero"], swaps=swaps, attribution="none", importance="zero", top_k=1)
    return run.read_json("rq4.json")


@pytest.fixture(scope="module")
def math_heads(smollm2_loaded, tmp_path_factory):
    return _heads_run(smollm2_loaded, MATH, MATH_LAYERS, ["own"], 4, tmp_path_factory.mktemp("heads_math"))


@pytest.fixture(scope="module")
def culture_heads(smollm2_loaded, tmp_path_factory):
    return _heads_run(smollm2_loaded, CULTURE, CULTURE_LAYERS, ["own", "swap"], 4,
                      tmp_path_factory.mktemp("heads_culture"))


@pytest.mark.real
def test_math_attn_4_changed_heads_are_its_four_layers_heads(math_heads):
    truth = {h for h in load_truth(MATH).changed_heads if h[0] in MATH_LAYERS}
    assert len(truth) == 18
    own, rec = math_heads["churn"]["own"], math_heads["planted"]["own"]
    called = {tuple(h) for h in own["heads"]}
    print(f"math-attn-4 own: {own['n_changed']} of {own['n_heads']} counted (BH, FDR {own['q']}), Storey "
          f"{own['share_storey']:.3f}, true {rec['true_share']:.3f}, AUROC {rec['auroc']:.3f}")
    assert rec["auroc"] >= 0.9 and rec["precision_at_true_count"] == 1.0
    assert called <= truth                                    # no head outside the four layers counted
    assert own["q"] == 0.05 and rec["false_discovery_proportion"] <= own["q"]
    assert called == truth                                    # measured: each changed head moves the readout
    assert rec["estimated_share"] == own["share"] and rec["true_share"] == pytest.approx(18 / 36)
    assert abs(own["share_storey"] - 0.5) <= 0.25 * 0.5
    # heads outside the changed layers, below (11) and above (25) them: their own change is exactly 0
    rows = {(r["layer"], r["head"]): r for r in math_heads["heads"]}
    assert all(rows[(l, h)]["own_change"] == 0.0 for l in (11, 25) for h in range(9))
    assert any("estimated share" in str(v) and "vs true" in str(v) for v in math_heads["headline"].values())


@pytest.mark.real
def test_mlp_only_culture_rung_changes_no_head_of_its_own(culture_heads):
    own, swap = culture_heads["churn"]["own"], culture_heads["churn"]["swap"]
    assert load_truth(CULTURE).changed_heads == ()
    assert own["n_changed"] == 0 and own["heads"] == [] and own["share_nonzero"] == 0.0
    assert own["share_interval"]["ci_high"] == 0.0
    rows = {(r["layer"], r["head"]): r for r in culture_heads["heads"]}
    assert all(r["own_change"] == 0.0 for r in rows.values())
    # input-driven change, reported beside: layer 21 reads layer 20's changed MLP output, layer 20's heads do not
    assert all(rows[(20, h)]["swap_change"] == 0.0 for h in range(9))
    assert swap["n_changed"] > 0 and {h[0] for h in swap["heads"]} == {21}
