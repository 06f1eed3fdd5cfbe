"""RQ4 stage (`mechdiff heads`) on the offline planted pairs and on a model against itself.

Known answers: planted-cognitive's 60 planted heads (o_proj noise) are recovered far above chance;
its heads changed while planted-cultural's (an MLP change + vocabulary) did not; a model against
itself has zero churn everywhere.
"""
import time

import pytest
import torch

from mechdiff.errors import ConfigError
from mechdiff.experiments import run_stage
from mechdiff.experiments.heads import RQ4Options, check
from mechdiff.pairs import load_pair

LAYERS = [20, 21, 28]     # planted-cognitive: 3 planted heads at 21 and 28, none at 20
SMALL = dict(layers=LAYERS, n_prompts=4, ablations=["zero"], top_k=4)


def _run(fixture, name, tmp_path_factory):
    base, tuned, _ = fixture
    out = tmp_path_factory.mktemp(name)
    t0 = time.perf_counter()
    run = run_stage("heads", load_pair(name), out=out, models=(base, tuned), **SMALL)
    return run, run.read_json("rq4.json"), time.perf_counter() - t0


@pytest.fixture(scope="session")
def rq4_cognitive(planted_cognitive, tmp_path_factory):
    return _run(planted_cognitive, "planted-cognitive", tmp_path_factory)


@pytest.fixture(scope="session")
def rq4_cultural(planted_cultural, tmp_path_factory):
    return _run(planted_cultural, "planted-cultural", tmp_path_factory)


def test_planted_heads_recovered_above_chance(rq4_cognitive, planted_cognitive):
    run, out, secs = rq4_cognitive
    truth = {tuple(h) for h in planted_cognitive[2]["heads"] if h[0] in LAYERS}
    assert len(truth) == 6
    for m, r in out["planted"].items():
        print(f"{m:12s} planted heads in top-{r['k']}: {r['observed']} (chance {r['expected']:.2f}, "
              f"p = {r['p_value']:.2g})")
    own = out["planted"]["own"]
    assert own["k"] == 6 and own["expected"] == pytest.approx(6 * 6 / 27)
    assert own["observed"] >= 5 and own["p_value"] < 1e-3
    assert out["planted"]["swap"]["observed"] > out["planted"]["swap"]["expected"]
    # Heads of the unplanted layer did not change themselves: their "own" effect is exactly zero.
    rows = {(r["layer"], r["head"]): r for r in out["heads"]}
    assert all(rows[(20, h)]["own_change"] == 0.0 for h in range(9))
    assert {(l, h) for (l, h), r in rows.items() if r["own_change"] > out["thresholds"]["floor"]} == truth
    # The count: a per-head test with FDR control (not a within-layer z cut) finds exactly the planted
    # heads; AUROC and precision at the true count against chance; Storey's share within 25% of 6/27.
    # (Three of the 30 layers keep the suite fast; the whole-model count is the same test on 270 heads.)
    own_count = out["churn"]["own"]
    assert {tuple(h) for h in own_count["heads"]} == truth and own_count["share_zcut"] < own_count["share"]
    assert abs(own_count["share_storey"] - 6 / 27) <= 0.25 * 6 / 27
    assert own["auroc"] >= 0.9 and own["precision_at_true_count"] == 1.0 and own["false_discovery_proportion"] == 0
    assert own_count["share_interval"]["ci_low"] <= 6 / 27 <= own_count["share_interval"]["ci_high"]
    print(f"planted-cognitive RQ4 run: {secs:.1f} s")


def test_churn_higher_on_cognitive_than_cultural(rq4_cognitive, rq4_cultural):
    cog, cul = rq4_cognitive[1]["churn"], rq4_cultural[1]["churn"]
    print("changed heads (own): cognitive", cog["own"], "cultural", cul["own"])
    print("importance churn (attribution): cognitive", cog["attribution"]["churn"], "cultural",
          cul["attribution"]["churn"])
    assert cog["own"]["share"] > cul["own"]["share"] == 0.0
    assert cog["own"]["share_nonzero"] == pytest.approx(6 / 27) and cul["own"]["share_nonzero"] == 0.0
    assert cul["own"]["heads"] == [] and cog["own"]["heads"]
    # The cultural knob moves the readout a lot, so importance rankings shift more there.
    assert cul["attribution"]["spearman"] < cog["attribution"]["spearman"]


def test_rq4_outputs_and_resume(rq4_cognitive, planted_cognitive):
    run, out, _ = rq4_cognitive
    assert len(out["heads"]) == 27
    row = out["heads"][0]
    for m in ("zero", "swap", "own", "attribution"):
        for s in ("base", "tuned"):
            assert f"{m}_{s}" in row and f"{m}_{s}_sd" in row
    for f in ("head_importance.png", "head_churn.png", "head_cumulative.png"):
        assert run.file(f"figures/{f}").stat().st_size > 1000
    assert "chance" in run.file("rq4_summary.txt").read_text()
    curves = out["cumulative"]
    assert set(curves) == {"ablate.base", "ablate.tuned", "own.base", "own.tuned"}
    assert len(curves["ablate.base"]["mean"]) == 4 and "all_heads" in curves["own.tuned"]
    before = {k: v["finished"] for k, v in run.steps().items()}
    again = run_stage("heads", load_pair("planted-cognitive"), out=run.path, models=planted_cognitive[:2], **SMALL)
    assert {k: v["finished"] for k, v in again.steps().items()} == before      # nothing recomputed


def _tiny_loaded(seed=0):
    from mechdiff.models.load import LoadedModel, model_dims
    from mechdiff.models.tiny import tiny_model
    from mechdiff.pairs.spec import ModelSpec
    model, tok = tiny_model("llama", seed=seed, n_layers=3)
    return LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path="/tiny"),
                       info={**model_dims(model), "source": "tiny", "spec": "tiny"})


def test_a_model_against_itself_has_zero_churn(tmp_path):
    m = _tiny_loaded()
    run = run_stage("heads", load_pair("smollm2-self"), out=tmp_path, models=(m, m), layers=[1, 2], n_prompts=3,
                    ablations=["zero", "mean"], attribution="ig", ig_steps=2, top_k=3, path=["1.0:logits"])
    out = run.read_json("rq4.json")
    for m_, r in out["churn"].items():
        assert r.get("churn", r.get("share")) == 0.0, m_
        if "topk_jaccard" in r:
            assert r["topk_jaccard"] == 1.0 and r["spearman"] == pytest.approx(1.0)
            iv = r["intervals"]        # every resample of prompts: the same tables on both sides
            assert iv["churn"]["ci_low"] == iv["churn"]["ci_high"] == 0.0, iv
            assert iv["topk_jaccard"]["ci_low"] == iv["topk_jaccard"]["ci_high"] == 1.0, iv
            assert iv["spearman"]["ci_low"] == pytest.approx(1.0) and iv["spearman"]["ci_high"] == pytest.approx(1.0)
        else:
            assert r["share_nonzero"] == 0.0 and r["n_changed"] == 0 and r["share_storey"] == 0.0
            assert r["share_interval"]["ci_high"] == 0.0            # no changed head, interval [0, 0]
    for key in ("own.base", "own.tuned"):
        assert out["cumulative"][key]["mean"] == [0.0] * 3
    path = run.read_json("rq4_path.json")["rows"]
    assert path[0]["per_prompt"] == path[1]["per_prompt"]


@pytest.mark.parametrize("bad", [dict(target="vibes"), dict(ablations=["zero", "zero"]), dict(swaps=["copy"]),
                                 dict(attribution="none"), dict(importance="mean", ablations=["zero"]),
                                 dict(layers=[30]), dict(top_k=0), dict(path=["20.1:attn_out.3"]),
                                 dict(path=["oops"]), dict(ablations=[], swaps=[])])
def test_bad_options_fail_before_model_work(bad):
    with pytest.raises(ConfigError):
        check(RQ4Options(**bad), 30)
    if "layers" not in bad:                   # value checks need no model (n_layers unknown)
        with pytest.raises(ConfigError):
            check(RQ4Options(**bad), None)
    check(RQ4Options(), None)


def test_cli_lists_heads_options():
    from typer.testing import CliRunner
    from mechdiff.cli import app
    res = CliRunner().invoke(app, ["heads", "--help"])
    assert res.exit_code == 0
    for flag in ("--layers", "--ablations", "--swaps", "--attribution", "--ig-steps", "--z-threshold", "--top-k"):
        assert flag in res.output


def test_head_variants_known_answers():
    """Zeroing every head = removing the attention output; swapping every head's contribution in from
    another model = patching in that model's attention output (contribution path, Llama) or its whole
    head_z (slice path, forced here)."""
    from mechdiff.analyses.heads import patches
    from mechdiff.data.prompts import encode
    from mechdiff.patching import Patch, PatchEngine
    from mechdiff.sites.capture import capture
    a, b = _tiny_loaded(0), _tiny_loaded(1)
    prompts = ["What is the capital of France?", "hi there", "2+2="]
    sites = ["head_z.1", "head_out.1", "attn_out.1"]
    ca, cb = (capture(m.model, m.tokenizer, prompts, sites) for m in (a, b))
    states = {"tuned.head_z.1": cb["head_z.1"], "base.head_z.1": ca["head_z.1"], "tuned.head_out.1": cb["head_out.1"],
              "base.head_out.1": ca["head_out.1"], "tuned.additive.1": torch.tensor(True)}
    eng = PatchEngine(b.model, encode(b.tokenizer, prompts), measure="decision")
    H = cb["head_z.1"].shape[1]
    run = lambda var: eng.run([var])[0]  # noqa: E731
    assert torch.allclose(run(patches(states, "tuned", 1, list(range(H)), "zero")),
                          run(Patch("attn_out.1", torch.zeros(cb["attn_out.1"].shape[1]))), atol=1e-4)
    want = run(Patch("attn_out.1", ca["attn_out.1"]))
    assert (want - eng.clean_logits).abs().max() > 1e-2
    assert torch.allclose(run(patches(states, "tuned", 1, list(range(H)), "swap")), want, atol=1e-4)
    states["tuned.additive.1"] = torch.tensor(False)
    assert torch.allclose(run(patches(states, "tuned", 1, list(range(H)), "swap")),
                          run(Patch("head_z.1", ca["head_z.1"])), atol=1e-4)


def test_same_tokens_ignores_pad_ids_but_not_tokens_or_lengths():
    from types import SimpleNamespace as B

    from mechdiff.experiments.steps import same_tokens
    m = torch.tensor([[0, 1, 1], [1, 1, 1]])
    a = B(input_ids=torch.tensor([[2, 5, 6], [7, 8, 9]]), attention_mask=m)
    assert same_tokens(a, B(input_ids=torch.tensor([[0, 5, 6], [7, 8, 9]]), attention_mask=m))   # another pad id
    assert not same_tokens(a, B(input_ids=torch.tensor([[2, 5, 4], [7, 8, 9]]), attention_mask=m))
    assert not same_tokens(a, B(input_ids=torch.tensor([[5, 6], [8, 9]]), attention_mask=m[:, 1:]))
