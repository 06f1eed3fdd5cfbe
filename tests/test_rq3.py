"""Known-answer tests of the RQ3 stage (``steer``) on the offline pairs.

Ground truth (tests/conftest.py fixtures): ``planted-cultural`` adds a rank-2 change along a shared
residual subspace U at layers 20/22/24 that fires on culture prompts; ``planted-cognitive`` adds small
random changes to 60 heads spread over 20 layers; ``smollm2-self`` is a model against itself. So at
layer 24 the tuned-minus-base handle of rank ~2 must remove most of the cultural gap when ablated
(a random basis of the same rank must not, nor the same handle at the early control layer), the
cognitive change must not be caught by a small k, and a model against itself has nothing to steer.
Runs are kept small (one layer, the diff handle, k <= 3) and shared per module.
"""
from __future__ import annotations

import json

import pytest
import torch

from mechdiff.errors import ConfigError

SMALL = dict(layers=[24], bases=["diff"], ks=[1, 2, 3], steer_alpha=[0.5, 1.0, 2.0], n_fit=16, n_dev=6, n_test=12,
             n_neutral=8, n_mc=8)


def _read(path, name):
    return json.loads((path / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def cultural(planted_cultural, tmp_path_factory):
    from mechdiff.experiments import run_stage
    from mechdiff.pairs import load_pair
    base, tuned, truth = planted_cultural
    run = run_stage("steer", load_pair("planted-cultural"), out=tmp_path_factory.mktemp("rq3_cultural"),
                    models=(base, tuned), **SMALL)
    return {"path": run.path, "rq3": _read(run.path, "rq3.json"), "truth": truth}


@pytest.fixture(scope="module")
def cognitive(planted_cognitive, tmp_path_factory):
    """Ablation only, on the shipped neutral set's English prompts (the distributed change moves them;
    the pair's own 16 math prompts are too few to split)."""
    from mechdiff.data.datasets import load_prompt_set
    from mechdiff.experiments import run_stage
    from mechdiff.pairs import load_pair
    base, tuned, _ = planted_cognitive
    out = tmp_path_factory.mktemp("rq3_cognitive")
    prompts = out / "neutral_en.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in load_prompt_set("neutral")
                               if r["lang"] == "en"), encoding="utf-8")
    run = run_stage("steer", load_pair("planted-cognitive"), out=out, models=(base, tuned), prompts=prompts,
                    **dict(SMALL, modes=["ablate"], transfer_lang=None))
    return _read(run.path, "rq3.json")


@pytest.mark.real
def test_planted_cultural_minimal_k_is_the_planted_rank_and_ablation_removes_most_of_it(cultural):
    res, rank = cultural["rq3"]["result"], cultural["truth"]["rank"]
    assert res["status"] == "found"
    ab = res["by_mode"]["ablate"]
    assert ab["layer"] == 24 and ab["kind"] == "diff"
    assert abs(ab["minimal_k"] - rank) <= 1
    cell = ab["cell"]
    assert cell["test_share"] > 0.5 and cell["within"]              # most of the gap, side effects in bounds
    assert cell["ppl_change_pct_unmasked"] <= 5.0 and cell["mc_drop_pp_unmasked"] <= 5.0
    # controls: a random basis of the same k, and the same handle at the early control layer (< 20)
    assert ab["random"]["k"] == cell["k"] and ab["random"]["test_share"] < 0.25 * cell["test_share"]
    ctl = ab["control_layer"]
    assert ctl["layer"] < 20 and ctl["basis_layer"] == 24 and ctl["test_share"] < 0.25 * cell["test_share"]
    # every cell is in rq3.json with dev and test shares; alpha was chosen on dev
    table = cultural["rq3"]["table"]
    modes = {r["mode"] for r in table}
    assert modes == {"steer", "add", "ablate", "map", "patch_base", "patch_tuned"}
    assert all(r["dev_share"] is not None for r in table) and all(r["alpha"] <= 1 for r in table if r["mode"] == "ablate")
    # estimates with intervals: the test share, the minimal k, the saturation k against the whole
    # difference patched at the layer (not against the best k tried), the rank of the difference
    est = ab["estimates"]
    assert est["test_share"]["ci_low"] <= cell["test_share"] <= est["test_share"]["ci_high"]
    sat = est["saturation_k"]
    assert sat["full_share"] > 0.5 and (sat["estimate"] is None or sat["estimate"] >= ab["minimal_k"])
    r24 = res["rank"]["24"]
    assert r24["estimate"] >= 2 and r24["ci_low"] <= r24["estimate"] <= r24["ci_high"]
    same = [r for r in table if r["mode"] == "ablate" and r["layer"] == 24 and r["kind"] == "diff"
            and r["fit_lang"] is None and r["k"] == cell["k"] and r["within"]]
    assert cell["dev_share"] == max(r["dev_share"] for r in same)
    text = (cultural["path"] / "rq3_summary.txt").read_text(encoding="utf-8")
    assert f"minimal k = {ab['minimal_k']}" in text and (cultural["path"] / "figures" / "steer_vs_k.png").is_file()


@pytest.mark.real
def test_rank_at_a_planted_layer_is_the_planted_rank(planted_cultural):
    """Layer 20 is the first planted layer: nothing differs below it, so the difference of the states
    at its output lies exactly in the planted rank-2 column space. The estimate is 2 with interval
    [2, 2], exactly low rank, and the top-2 basis is the planted subspace (angles ~0)."""
    from mechdiff.analyses import rank as RK
    from mechdiff.data.prompts import encode
    from mechdiff.models.planted import ground_truth_tensors, prompt_split
    from mechdiff.sites.capture import capture
    base, tuned, truth = planted_cultural
    prompts = [p for p in prompt_split("cultural") if encode(base.tokenizer, [p]).input_ids.tolist()
               == encode(tuned.tokenizer, [p]).input_ids.tolist()]
    assert len(prompts) >= 8
    H = {n: capture(m.model, m.tokenizer, prompts, ["resid_post.20"], positions=("k", 4))
         for n, m in (("base", base), ("tuned", tuned))}
    Hb, idx = H["base"].flat("resid_post.20")
    est = RK.estimate_rank(RK.differences(H["tuned"].flat("resid_post.20")[0], Hb), idx // 2, n_boot=50,
                           scale=float(Hb.double().pow(2).mean().sqrt()))
    assert est["estimate"] == truth["rank"] == 2 and (est["ci_low"], est["ci_high"]) == (2, 2) and est["exact"]
    D = RK.differences(H["tuned"].flat("resid_post.20")[0], Hb)
    top = torch.linalg.svd(D, full_matrices=False)[2][:2].T
    assert float(RK.principal_angles(top, ground_truth_tensors("planted-cultural")["u"]).max()) < 1.0
    below = capture(tuned.model, tuned.tokenizer, prompts, ["resid_post.19"], positions=("k", 4)).flat("resid_post.19")[0]
    same = capture(base.model, base.tokenizer, prompts, ["resid_post.19"], positions=("k", 4)).flat("resid_post.19")[0]
    assert RK.estimate_rank(RK.differences(below, same), idx // 2, n_boot=10)["estimate"] == 0   # nothing below


@pytest.mark.real
def test_planted_cultural_handle_transfers_from_kazakh_prompts(cultural):
    rows = {(t["handle_fit_on"], t["mode"]): t for t in cultural["rq3"]["transfer"]}
    kk, every = rows[("kk", "ablate")], rows[("all languages", "ablate")]
    assert {"share_kk", "share_ru", "share_en"} <= set(kk)
    # the planted change is language-independent: a handle fitted on Kazakh prompts only also
    # removes a clear share of the gap on Russian and English prompts it never saw
    assert kk["share_kk"] > 0.3 and kk["share_ru"] > 0.2 and kk["share_en"] > 0.2
    assert {"share_kk", "share_ru", "share_en"} <= set(every)


@pytest.mark.real
def test_saved_handle_loads_and_applies_in_two_lines(cultural, planted_cultural):
    """The saved ablation handle, applied in two lines at the decision token with the base's state on
    each prompt as its reference (what the sweep does), reproduces the sweep's per-prompt
    KL(base || tuned patched) for its cell on the test prompts."""
    from mechdiff.patching.kl import kl_shared
    from mechdiff.analyses.steering import Handle
    from mechdiff.artifacts import RunDir
    from mechdiff.data.datasets import load_prompt_set
    from mechdiff.data.prompts import encode
    from mechdiff.fairness import shared_vocab
    base, tuned, _ = planted_cultural
    path, cell = cultural["path"], cultural["rq3"]["result"]["by_mode"]["ablate"]["cell"]
    prefix = path / next(h for h in cultural["rq3"]["handles"] if h.endswith("_ablate"))
    meta = _read(path, "rq3_cells.json")
    keys = ("layer", "basis_layer", "kind", "fit_lang", "mode", "k", "alpha")
    row = [c for c in meta["cells"] if c["side"] == "tuned"].index({**{k: cell[k] for k in keys}, "side": "tuned",
                                                                      "control_layer": False})
    want = RunDir(path).read_tensors("tensors/rq3_sweep.safetensors")["tuned/kl"][row]
    by_id = {p["id"]: p for p in load_prompt_set("cultural")}
    idx = list(range(meta["n_dev"], meta["n_dev"] + 4))                  # four test prompts
    prompts = [by_id[meta["eval_ids"][i]] for i in idx]
    bb, bt = encode(base.tokenizer, prompts), encode(tuned.tokenizer, prompts)
    sv, ar = shared_vocab(base.tokenizer, tuned.tokenizer), torch.arange(len(prompts))
    with torch.no_grad():
        lb = base.model(**bb.model_inputs()).logits[ar, bb.decision]
        ref = RunDir(path).read_tensors("tensors/rq3_states.safetensors")["base/eval/resid_post.24"][idx]
        with Handle.load(prefix).apply(tuned.model, bt.decision, reference=ref):         # the two lines
            la = tuned.model(**bt.model_inputs()).logits[ar, bt.decision]
        lt = tuned.model(**bt.model_inputs()).logits[ar, bt.decision]
    got = kl_shared(lb, la, sv.a_ids, sv.b_ids)
    assert torch.allclose(got, want[idx], rtol=1e-3, atol=1e-4), (got, want[idx])
    assert float(got.mean()) < float(kl_shared(lb, lt, sv.a_ids, sv.b_ids).mean())   # it moved toward the base


@pytest.mark.real
def test_planted_cognitive_no_small_k_does_as_well(cultural, cognitive):
    cult = cultural["rq3"]["result"]["by_mode"]["ablate"]["cell"]["test_share"]
    best = max(r["test_share"] for r in cognitive["chosen"] if r["mode"] == "ablate" and r["k"] <= 3
               and r["layer"] == 24 and r["kind"] == "diff")
    # ablation now moves the subspace component to the base's own state on each prompt (issue 24), which
    # a rank-k handle does for part of a distributed change too: measured 0.37 (cognitive, best k <= 3)
    # against 0.64 (cultural); under the old reflecting ablation the ratio was below one half
    assert best < 0.75 * cult
    ab = cognitive["result"]["by_mode"]["ablate"]
    assert ab["minimal_k"] is None or ab["cell"]["test_share"] < 0.5 * cult


@pytest.mark.real
def test_model_against_itself_has_nothing_to_steer(smollm2_loaded, tmp_path):
    from mechdiff.experiments import run_stage
    from mechdiff.pairs import load_pair
    run = run_stage("steer", load_pair("smollm2-self"), out=tmp_path, models=(smollm2_loaded, smollm2_loaded),
                    **dict(SMALL, n_fit=4, n_dev=2, n_test=4))
    out = _read(run.path, "rq3.json")
    assert out["result"]["status"] == "nothing to steer" and out["result"]["minimal_k"] is None
    assert out["gap_kl"] == {"base": 0.0, "tuned": 0.0} and out["table"] == []
    rank = _read(run.path, "rq3_bases.json")["rank.24"]     # the difference is exactly 0: rank 0, interval [0, 0]
    assert (rank["estimate"], rank["ci_low"], rank["ci_high"]) == (0, 0, 0), rank
    assert "nothing to steer" in (run.path / "rq3_summary.txt").read_text(encoding="utf-8")
    assert not (run.path / "figures" / "steer_vs_k.png").exists()


@pytest.mark.parametrize("bad", [dict(ks=[0]), dict(layers=[99]), dict(modes=["zap"]), dict(bases=["pca"]),
                                 dict(n_fit=3), dict(positions="some"), dict(gap_threshold=0.0)])
def test_bad_options_raise_config_error_before_model_work(bad, tmp_path):
    from mechdiff.experiments.steer import RQ3Options, check
    with pytest.raises(ConfigError):
        check(RQ3Options(**dict(SMALL, **bad)), 30)
    from mechdiff.checks import check_option_counts
    with pytest.raises(ConfigError, match="--steer-alpha: expected a comma list of finite numbers > 0"):
        check_option_counts(RQ3Options(steer_alpha=["x"]))


def test_minimal_k_and_layer_are_chosen_on_dev_and_reported_on_test():
    """Issue 11 (choose on dev, report on test), RQ3: a cell that looks good on test but not on dev
    (k=1 at L5: +40% test, -20% dev) is not the minimal k; k=2 at L5 (15% dev) is, and its test share
    is what is reported; the layer with the better dev evidence wins over a better test share."""
    from mechdiff.experiments.steer_summary import _headline, minimal_k

    def cell(layer, k, dev, test, kind="diff", within=True):
        return {"layer": layer, "basis_layer": layer, "kind": kind, "fit_lang": None, "mode": "ablate", "k": k,
                "alpha": 1.0, "side": "tuned", "dev_share": dev, "test_share": test, "within": within}
    rows = [cell(5, 1, -0.2, 0.4), cell(5, 2, 0.15, 0.05), cell(5, 3, 0.3, 0.2),
            cell(7, 1, 0.05, 0.9), cell(7, 2, 0.08, 0.95),
            cell(5, 2, 0.01, 0.0, kind="random"), cell(9, 2, 0.0, 0.0, kind="diff")]
    assert minimal_k([r for r in rows if r["layer"] == 5 and r["kind"] == "diff"], 0.1) == 2
    assert minimal_k([r for r in rows if r["layer"] == 5 and r["kind"] == "diff"], 0.1, on="test_share") == 1
    h = _headline(rows, "ablate", [5, 7], 9, 0.1)
    assert (h["layer"], h["minimal_k"]) == (5, 2) and h["cell"]["test_share"] == 0.05
    assert h["k_saturation"] == 3 and h["random"]["kind"] == "random"


def test_cells_analyse_an_exactly_low_rank_layer_up_to_its_rank():
    """A diff basis with 2 columns (the difference is exactly rank 2) is analysed at k = 1, 2 (not
    dropped); ablation never uses alpha > 1; the map mode appears where its map was fitted; the whole
    difference is one cell per side; the saturation estimate is taken against it."""
    from mechdiff.experiments.steer import RQ3Options, _cells
    from mechdiff.experiments.steer_summary import estimates
    opts = RQ3Options(**dict(SMALL, transfer_lang=None))
    bases = {"diff.24": torch.eye(8)[:, :2], "random.24": torch.eye(8)[:, 3:6], "scale.24": torch.ones(1),
             **{f"mapA.diff.24@24.k{k}": torch.eye(k) for k in (1, 2)}}
    cells = _cells({"layers": [24], "control": 8}, opts, bases, True)
    at24 = [c for c in cells if c["layer"] == 24]
    assert {c["k"] for c in at24 if c["kind"] == "diff"} == {1, 2}
    assert {c["k"] for c in at24 if c["kind"] == "random"} == {1, 2, 3}
    assert all(c["alpha"] <= 1 for c in cells if c["mode"] == "ablate")
    assert {c["mode"] for c in at24 if c["kind"] == "diff"} == {"steer", "add", "ablate", "map"}
    assert not [c for c in cells if c["layer"] == 8 and c["mode"] == "map"]          # no map fitted there
    assert sorted(c["side"] for c in cells if c["kind"] == "full") == ["base", "tuned"]
    # saturation against the whole difference: shares 0.5, 0.95 at k = 1, 2; the whole closes 1.0
    n = 12
    gap = torch.ones(n)
    rows = [{"layer": 24, "basis_layer": 24, "kind": "diff", "fit_lang": None, "mode": "ablate", "k": k, "alpha": 1.0,
             "side": "tuned", "within": True, "sweep_index": i} for i, k in enumerate((1, 2))]
    rows.append({"layer": 24, "basis_layer": 24, "kind": "full", "fit_lang": None, "mode": "patch_tuned", "k": None,
                 "alpha": 1.0, "side": "tuned", "within": None, "sweep_index": 2})
    sweep = {"tuned/kl": torch.stack([0.5 * gap, 0.05 * gap, 0 * gap]), "tuned/gap": gap}
    h = {"cell": {**rows[0], "test_share": 0.5}, "curve": rows[:2], "layer": 24, "kind": "diff", "mode": "ablate"}
    est = estimates(h, rows, sweep, {"n_dev": 4, "eval_groups": list(range(n))}, opts)
    assert est["saturation_k"]["estimate"] == 2 and est["saturation_k"]["full_share"] == 1.0
    assert est["minimal_k"]["estimate"] == 1 and est["test_share"]["estimate"] == pytest.approx(0.5)
