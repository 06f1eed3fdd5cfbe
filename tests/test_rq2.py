"""Known-answer tests of the RQ2 runner (maps, mapped patching, alpha-sweep, controls) on planted-cultural.

Ground truth: layers 0..19 of the tuned model are the base's, layers 20/22/24 carry a rank-2 change.
So at a planted layer the raw base state patched into the tuned model moves its next-token
distribution (KL_raw > 0) and a base->tuned map fitted on train prompts must remove most of that on
held-out prompts; at the control layer (below 20) raw KL is 0 and a late-layer map applied there
cannot help. A shuffled-pairs map must not generalise, and a model mapped to itself through the
identity must not move at all.
"""
from __future__ import annotations

import json

import pytest
import torch

PLANTED_LAYERS = [22, 24]
SITE = "resid_post"
SOLVER = "ridge"
SOLVERS = ["ridge", "procrustes"]         # compared in one run; the tests below read ridge's rows
N_TRAIN, N_VAL = 40, 16


def _read(path, name):
    return json.loads((path / name).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def rq2_run(planted_cultural, tmp_path_factory):
    """mapped-patch on planted-cultural over the cultural set's English prompts (short: half the
    tokens of the mixed kk/ru/en set; raw patching at layers 22/24 still moves the tuned model)."""
    from mechdiff.data.datasets import load_prompt_set
    from mechdiff.experiments.maps import RQ2Options, run_mapped_patch
    from mechdiff.pairs import load_pair

    base, tuned, _ = planted_cultural
    out = tmp_path_factory.mktemp("rq2_planted")
    prompts = out / "cultural_en.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in load_prompt_set("cultural")
                               if r["lang"] == "en"), encoding="utf-8")
    opts = RQ2Options(layers=list(PLANTED_LAYERS), sites=[SITE], solvers=list(SOLVERS), n_train=N_TRAIN,
                      n_val=N_VAL, side_n=6)
    run = run_mapped_patch(load_pair("planted-cultural"), opts, out=out, models=(base, tuned),
                           prompts=str(prompts))
    p = run.path
    return {"path": p, "opts": opts, "sweep": _read(p, "alpha_sweep.json"), "maps": _read(p, "maps.json"),
            "prompts": _read(p, "rq2_prompts.json"), "prompt_file": prompts, "variants": _read(p, "variants.json")}


@pytest.mark.real
def test_mapped_patch_removes_most_of_the_raw_kl_at_planted_layers(rq2_run):
    rows = {(r["layer"], r["alpha"]): r for r in rq2_run["sweep"]["table"] if r["site"] == SITE and r["solver"] == SOLVER}
    assert {l for l, _ in rows} == set(PLANTED_LAYERS)
    for l in PLANTED_LAYERS:
        r = rows[(l, "1.0")]
        assert r["alpha_value"] == 1.0
        assert r["kl_raw"] > 0.05, r  # the planted change is visible to raw patching
        assert r["kl_mapped"] < 0.5 * r["kl_raw"], r
        assert r["drop_pct"] > 50.0 and r["delta"] == pytest.approx(r["kl_raw"] - r["kl_mapped"])
        # every alpha of the sweep is present
        assert {a for (ll, a) in rows if ll == l} == set(rq2_run["opts"].mapped_alpha)


@pytest.mark.real
def test_bogus_control_does_not_reduce_kl(rq2_run):
    control = rq2_run["prompts"]["control_layer"]
    assert 0 < control < 20  # below the first planted layer
    bogus = [c for c in rq2_run["sweep"]["controls"] if c["control"] == "bogus" and c["solver"] == SOLVER]
    layers = rq2_run["prompts"]["layers"]
    assert sorted(c["map_layer"] for c in bogus) == sorted(layers)   # one per chosen layer's map
    b = next(c for c in bogus if c["map_layer"] == PLANTED_LAYERS[0])
    assert b["layer"] == control
    # raw patching at the control layer is a no-op (identical layers): KL_raw ~ 0
    assert b["kl_raw"] is not None and b["kl_raw"] < 1e-5
    assert b["drop_pct"] is None or b["drop_pct"] <= 0
    assert b["kl_mapped"] >= b["kl_raw"]
    assert b["kl_mapped"] > 0.05  # a layer-22 map is garbage at layer 9: it moves the model a lot
    # the sweep's shuffled-pairs map does far worse than the real map at the same layer (on the test
    # prompts it can still beat the raw base state: it predicts about the tuned mean, measured 45% drop
    # vs 91% for the real ridge map, which is what the stop condition's control check weighs)
    real = {(r["solver"], r["layer"]): r["kl_mapped"] for r in rq2_run["sweep"]["table"] if r["alpha"] == "1.0"}
    for c in rq2_run["sweep"]["controls"]:
        if c["control"] == "shuffle":
            assert c["kl_mapped"] > 2 * real[(c["solver"], c["layer"])], c


@pytest.mark.real
def test_shuffle_control_does_not_generalise(rq2_run):
    """A map fitted on row-shuffled targets has val R2 ~ 0 at the planted layers. At the control
    layer (base == tuned states, so the shuffled targets are the inputs permuted) one permutation's
    R2 is noisy with 40 train rows (seeds 0..9 give -0.45..+0.13), so there it only has to stay far
    below the real map's."""
    table = [r for r in rq2_run["maps"]["table"] if r["solver"] == SOLVER]
    control = rq2_run["prompts"]["control_layer"]
    assert {r["layer"] for r in table} == set(PLANTED_LAYERS) | {control}
    for r in table:
        assert r["shuffle_val_r2_vw"] is not None
        assert r["val_r2_vw"] > r["shuffle_val_r2_vw"] + 0.3, r  # the real map does generalise
        if r["layer"] in PLANTED_LAYERS:
            assert abs(r["shuffle_val_r2_vw"]) < 0.1, r
        else:
            assert r["control_layer"] and r["identity_val_r2_vw"] == pytest.approx(1.0, abs=1e-9)


@pytest.mark.real
def test_train_and_val_prompts_are_disjoint(rq2_run):
    pr = rq2_run["prompts"]
    assert len(pr["train"]) == N_TRAIN and len(pr["val"]) == N_VAL
    assert len(set(pr["train"])) == N_TRAIN and len(set(pr["val"])) == N_VAL
    assert not set(pr["train"]) & set(pr["val"])
    assert pr["layers"] == PLANTED_LAYERS and pr["sites"] == [SITE]
    # train / dev / test share no topic (a topic holds all translations of its prompts)
    from mechdiff.data.datasets import load_prompt_set
    topic = {r["id"]: r["topic"] for r in load_prompt_set("cultural")}
    assert pr["val"] == pr["dev"] + pr["test"] and len(pr["dev"]) == len(pr["test"]) == N_VAL // 2
    parts = [{topic[i] for i in pr[k]} for k in ("train", "dev", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), parts
    for r in rq2_run["maps"]["table"]:      # every map's test R2 with its interval over topic groups
        iv = r["test_r2_interval"]
        assert iv["estimate"] == pytest.approx(r["test_r2_vw"], abs=1e-9) and iv["ci_low"] <= iv["ci_high"]


@pytest.mark.real
def test_solvers_are_compared_in_one_run_and_a_later_run_never_refits_another_solvers_maps(rq2_run, planted_cultural):
    """mapped-patch swept both solvers (winner chosen on dev among them); a `maps` run with a third solver
    in the same directory reuses the capture, fits only its own solver, leaves the others' map files
    byte-identical and maps.json then lists all three; Procrustes reports its undetermined directions."""
    from mechdiff.experiments.maps import MapsOptions, run_maps
    from mechdiff.pairs import load_pair

    p, var = rq2_run["path"], rq2_run["variants"]
    assert var["solvers"] == SOLVERS and var["n_dev"] == N_VAL // 2 and var["n_test"] == N_VAL - N_VAL // 2
    assert {v["solver"] for v in var["variants"] if v["kind"] == "mapped"} == set(SOLVERS)
    assert {r["solver"] for r in rq2_run["sweep"]["tables"]["best per (layer, site)"]} == set(SOLVERS)
    assert rq2_run["sweep"]["stop_conditions"]["chosen_on"] == "dev"
    pro = [r for r in rq2_run["maps"]["table"] if r["solver"] == "procrustes"]
    assert pro and all(r["n_underdetermined"] == 576 - (N_TRAIN - 1) for r in pro)   # N < d: completed with I
    before = {f.name: f.read_bytes() for f in (p / "maps").iterdir()}
    steps = _read(p, "steps.json")["steps"]
    control = rq2_run["prompts"]["control_layer"]
    opts = MapsOptions(layers=list(PLANTED_LAYERS), sites=[SITE], solvers=["procrustes_scaled"], n_train=N_TRAIN,
                       n_val=N_VAL, control_layer=control)
    base, tuned, _ = planted_cultural
    run_maps(load_pair("planted-cultural"), opts, out=p, models=(base, tuned), prompts=str(rq2_run["prompt_file"]))
    after = {f.name: f.read_bytes() for f in (p / "maps").iterdir()}
    assert {k: v for k, v in after.items() if k in before} == before          # nothing refitted or overwritten
    assert {k for k in after if k not in before} == {f"L{l}_{SITE}_procrustes_scaled.{e}" for l in
                                                     PLANTED_LAYERS + [control] for e in ("json", "safetensors")}
    new_steps = _read(p, "steps.json")["steps"]
    assert new_steps["rq2.capture"] == steps["rq2.capture"]                   # the capture was reused
    assert all(new_steps[f"rq2.maps.{s}"] == steps[f"rq2.maps.{s}"] for s in SOLVERS)
    assert {r["solver"] for r in _read(p, "maps.json")["table"]} == set(SOLVERS) | {"procrustes_scaled"}


@pytest.mark.real
def test_alpha_sweep_reports_stop_conditions(rq2_run):
    sw = rq2_run["sweep"]
    stop = sw["stop_conditions"]
    assert set(stop) >= {"large_drop", "side_effects_small", "controls_not_comparable", "met", "thresholds"}
    assert stop["thresholds"]["drop_pct"] == 30.0
    assert stop["large_drop"] is True  # the winner's drop is > 50% (see the first test)
    assert isinstance(stop["met"], bool)
    assert sw["winner"]["layer"] in PLANTED_LAYERS
    assert sw["headline"]["stop conditions met"] == stop["met"]
    side = sw["side_effects"]
    assert side and {(s["layer"], s["site"]) for s in side} == {(l, SITE) for l in PLANTED_LAYERS}
    txt = (rq2_run["path"] / "rq2_summary.txt").read_text(encoding="utf-8")
    assert "stop conditions met" in txt and "control bogus" in txt


@pytest.mark.real
def test_saved_maps_load_back_with_the_same_transform(rq2_run, tmp_path):
    from mechdiff.analyses import maps as M
    from mechdiff.analyses.map_metrics import map_metrics
    from safetensors.torch import load_file

    p = rq2_run["path"]
    states = load_file(str(p / "tensors" / "rq2_states.safetensors"))
    by_layer = {r["layer"]: r for r in rq2_run["maps"]["table"] if r["solver"] == SOLVER}
    for l in sorted(by_layer):
        prefix = p / "maps" / f"L{l}_{SITE}_{SOLVER}"
        assert prefix.with_suffix(".safetensors").is_file() and prefix.with_suffix(".json").is_file()
        m = M.load_map(prefix)
        assert isinstance(m, M.RidgeMap) and (m.dx_, m.dy_) == (576, 576)
        X, Y = states[f"base/train/{SITE}.{l}"], states[f"tuned/train/{SITE}.{l}"]
        Xv, Yv = states[f"base/val/{SITE}.{l}"], states[f"tuned/val/{SITE}.{l}"]
        assert X.shape == (N_TRAIN, 576) and Xv.shape == (N_VAL, 576)
        # the loaded map reproduces the val metrics the runner computed with the in-memory map
        va = map_metrics(m.transform(Xv), Yv, X=Xv, Y_train_mean=Y.mean(0))
        assert va["r2_vw"] == pytest.approx(by_layer[l]["val_r2_vw"], abs=1e-6)
        assert va["cka_debiased"] == pytest.approx(by_layer[l]["val_cka"], abs=1e-6)
        # refitting with the saved hyper-parameters on the saved train states gives the same map
        refit = type(m)(**m.hparams()).fit(X, Y)
        a, b = m.transform(Xv).double(), refit.transform(Xv).double()
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))
        # save -> load round trip is exact
        m.save(tmp_path / f"L{l}")
        assert torch.equal(M.load_map(tmp_path / f"L{l}").transform(Xv), m.transform(Xv))


@pytest.mark.real
def test_identity_map_of_a_model_onto_itself_gives_zero_kl(planted_cultural):
    from mechdiff.analyses.maps import IdentityMap
    from mechdiff.data.datasets import load_prompt_set
    from mechdiff.data.prompts import encode
    from mechdiff.patching import Patch, PatchEngine, patch_kl

    base = planted_cultural[0]
    prompts = load_prompt_set("neutral")[:8]
    sites = [f"{SITE}.{l}" for l in (9, 22)]
    eng = PatchEngine(base.model, encode(base.tokenizer, prompts), measure="decision", record_sites=sites)
    clean = eng.clean_states()
    variants, controls = [], []
    for s in sites:
        m = IdentityMap().fit(clean[s], clean[s])
        variants.append(Patch(s, m.transform(clean[s])))
        controls.append(Patch(s, clean[s].roll(1, dims=0)))  # another prompt's state: must move
    kl = patch_kl(eng, variants + controls)                  # [4, 8]
    assert kl.shape == (4, 8)
    assert float(kl[:2].abs().max()) < 1e-6, kl[:2]
    assert float(kl[2:].mean(1).min()) > 1e-3, kl[2:]


@pytest.mark.real
def test_k_positions_per_prompt_give_k_times_the_training_rows(planted_cultural, tmp_path):
    """K positions per prompt (excluding the last m content tokens): the map is fitted on about K x
    n_train rows, base and tuned rows pair up token by token, and val stays at the decision token."""
    from mechdiff.experiments.maps import STATES, RQ2Options, run_maps
    from mechdiff.pairs import load_pair
    from safetensors.torch import load_file

    base, tuned, _ = planted_cultural
    opts = RQ2Options(layers=[22], sites=[SITE], solvers=["procrustes"], n_train=12, n_val=6,
                      k_positions=4, exclude_last=2, control_layer=9)
    run = run_maps(load_pair("planted-cultural"), opts, out=tmp_path / "k4", models=(base, tuned))
    st = load_file(str(run.file(STATES)))
    xb, xt = st[f"base/train/{SITE}.22"], st[f"tuned/train/{SITE}.22"]
    assert xb.shape == xt.shape and 12 < xb.shape[0] <= 48       # up to K=4 rows per prompt
    assert torch.equal(st["base/train_prompt_index"], st["tuned/train_prompt_index"])
    assert st[f"base/val/{SITE}.22"].shape[0] == 6
    # below the planted layers the two models are identical, so the paired rows are equal
    assert torch.allclose(st[f"base/train/{SITE}.9"], st[f"tuned/train/{SITE}.9"], atol=1e-5)


# ---------------------------------------------------------------- stop conditions (no model; issue 11)
def _variants(n_dev=4):
    """variants.json for one (layer, site): raw KL 1.0; alpha 0.5 is best on dev (0.2) but worse on test
    (0.6); alpha 1.0 the reverse; bogus / shuffle controls with defined drops far below the winner's."""
    rows = [{"solver": None, "layer": 22, "site": SITE, "alpha": None, "kind": "raw", "kl_mean": 1.0, "kl_dev_mean": 1.0},
            {"solver": "ridge", "layer": 22, "site": SITE, "alpha": "0.5", "alpha_value": 0.5, "kind": "mapped",
             "map_layer": 22, "kl_mean": 0.6, "kl_dev_mean": 0.2},
            {"solver": "ridge", "layer": 22, "site": SITE, "alpha": "1.0", "alpha_value": 1.0, "kind": "mapped",
             "map_layer": 22, "kl_mean": 0.1, "kl_dev_mean": 0.5},
            {"solver": "ridge", "layer": 22, "site": SITE, "alpha": "1.0", "alpha_value": 1.0, "kind": "shuffle",
             "map_layer": 22, "kl_mean": 1.2, "kl_dev_mean": 1.1},
            {"solver": "ridge", "layer": 9, "site": SITE, "alpha": "1.0", "alpha_value": 1.0, "kind": "bogus",
             "map_layer": 22, "kl_mean": 2.0, "kl_dev_mean": 2.0},
            {"solver": None, "layer": 9, "site": SITE, "alpha": None, "kind": "raw", "kl_mean": 0.5, "kl_dev_mean": 0.5}]
    for r in rows:
        r["kl_unmasked_mean"] = r["kl_mean"]
    return {"solvers": ["ridge"], "solver": "ridge", "measure": "decision", "n_val": 8, "n_dev": n_dev, "n_test": 4,
            "variants": rows}


SIDE_OK = [{"solver": "ridge", "layer": 22, "site": SITE, "alpha": "0.5", "d_refusal_pp_unmasked": 0.0,
            "d_mc_dlogp_unmasked": 0.01, "refusal_clean_unmasked": 0.5}]


def test_alpha_and_winner_are_chosen_on_dev_and_reported_on_test():
    from mechdiff.experiments.maps_summary import sweep_table
    t = sweep_table(_variants())
    w = t["winner"]
    assert (w["solver"], w["alpha"]) == ("ridge", "0.5")                  # best on dev (0.2), not on test
    assert w["kl_mapped"] == 0.6 and w["drop_pct"] == pytest.approx(40.0)  # reported on test
    assert w["dev_drop_pct"] == pytest.approx(80.0)


def test_a_near_identity_map_over_a_tiny_gap_does_not_win():
    """A layer whose raw patch KL is a small share of the largest (a fine-tune touching every layer
    enters at layer 0) cannot win on its drop % alone: the winner is the best drop among layers that
    carry at least WINNER_GAP_SHARE of the largest raw KL."""
    from mechdiff.experiments.maps_summary import WINNER_GAP_SHARE, sweep_table
    v = _variants()
    v["variants"] += [{"solver": None, "layer": 0, "site": SITE, "alpha": None, "kind": "raw", "kl_mean": 7e-4,
                       "kl_dev_mean": 7e-4, "kl_unmasked_mean": 7e-4},
                      {"solver": "ridge", "layer": 0, "site": SITE, "alpha": "1.0", "alpha_value": 1.0,
                       "kind": "mapped", "map_layer": 0, "kl_mean": 1e-6, "kl_dev_mean": 1e-6, "kl_unmasked_mean": 1e-6}]
    t = sweep_table(v)
    assert 7e-4 < WINNER_GAP_SHARE * 1.0
    assert t["winner"]["layer"] == 22 and t["winner"]["alpha"] == "0.5"
    assert any(r["layer"] == 0 and r["dev_drop_pct"] > 99 for r in t["best"])    # still listed, not chosen


def test_stop_conditions_use_the_controls_of_the_winners_own_map():
    """The controls compared with the winner are those of its own map (solver, layer, site): a control
    of another layer's map does not count, and with none of its own the condition is not met."""
    from mechdiff.experiments.maps_summary import stop_conditions, sweep_table
    v = _variants()
    for r in v["variants"]:
        if r["kind"] in ("bogus", "shuffle"):
            r["map_layer"] = 21                                   # controls of another layer's map only
    stop = stop_conditions(sweep_table(v), SIDE_OK)
    assert not stop["controls_not_comparable"] and "winner's map" in stop["reasons"]["controls_not_comparable"]
    stop = stop_conditions(sweep_table(_variants()), SIDE_OK)     # its own (map_layer 22): compared
    assert stop["controls_not_comparable"], stop["reasons"]


def test_stop_conditions_met_only_on_defined_evidence():
    from mechdiff.experiments.maps_summary import stop_conditions, sweep_table
    t = sweep_table(_variants())
    ok = stop_conditions(t, SIDE_OK)
    assert ok["met"] is True and ok["reasons"] == {}
    # side effects missing (--no-side-effects) or undefined
    for side, why in ((None, "not measured"), ([{**SIDE_OK[0], "d_refusal_pp_unmasked": None}], "undefined"),
                      ([{**SIDE_OK[0], "refusal_clean_unmasked": 0.0}], "refuses none")):
        s = stop_conditions(t, side)
        assert s["met"] is False and s["side_effects_small"] is False and why in s["reasons"]["side_effects_small"]
    # a control whose drop is undefined (raw KL 0 where it is applied) is evidence of nothing
    v = _variants()
    v["variants"][-1].update(kl_mean=0.0, kl_dev_mean=0.0)                # raw KL 0 at the bogus layer
    s = stop_conditions(sweep_table(v), SIDE_OK)
    assert s["met"] is False and s["controls_not_comparable"] is False
    assert "bogus control at L9 has no defined drop" in s["reasons"]["controls_not_comparable"]
    # no raw KL at the winner's layer: no drop is defined
    v = _variants()
    v["variants"][0].update(kl_mean=0.0, kl_dev_mean=0.0)
    s = stop_conditions(sweep_table(v), SIDE_OK)
    assert s["met"] is False and s["large_drop"] is False and "undefined" in s["reasons"]["large_drop"]


def test_no_dev_drop_above_zero_means_no_map_transfers_the_change():
    """Issue 24: where no layer's mapped patch reduces the gap on dev (every dev drop <= 0; the GPU study
    of smollm2-math-lora named "winner L19, dev -40%, test -378%"), the answer is "no map transfers the
    change", not a winner: no winner, the stop conditions unmet for that reason, the summary says so."""
    from mechdiff.experiments.maps_summary import NO_TRANSFER, mapped_patch_result, stop_conditions, summary_text, \
        sweep_table
    from mechdiff.experiments.summaries import rq2_text
    v = _variants()
    for r in v["variants"]:
        if r["kind"] == "mapped":                 # raw dev KL 1.0: mapped 1.4 / 1.1 are dev drops of -40% / -10%
            r["kl_dev_mean"], r["kl_mean"] = (1.4, 4.78) if r["alpha"] == "0.5" else (1.1, 0.9)
    t = sweep_table(v)
    assert t["winner"] is None and t["answer"].startswith(NO_TRANSFER) and "-10.0%" in t["answer"]
    assert max(r["dev_drop_pct"] for r in t["best"]) == pytest.approx(-10.0)      # still listed, not chosen
    stop = stop_conditions(t, SIDE_OK)
    assert stop["met"] is False and stop["reasons"]["large_drop"].startswith(NO_TRANSFER)
    meta = {"n_val": 8, "n_dev": 4, "n_test": 4, "solvers": ["ridge"], "measure": "decision"}
    assert f"answer: {NO_TRANSFER}" in summary_text(t, SIDE_OK, stop, meta) and "winner (" not in summary_text(
        t, SIDE_OK, stop, meta)
    sweep = {"winner": None, "answer": t["answer"], "controls": t["controls"], "stop_conditions": stop,
             "headline": {"measure": "decision"}}
    assert any(NO_TRANSFER in s for s in rq2_text(None, sweep, v))
    assert mapped_patch_result(sweep).winner is None
    # one positive dev drop (at a layer carrying the gap) is a winner again
    v["variants"][2]["kl_dev_mean"] = 0.9
    assert sweep_table(v)["winner"]["dev_drop_pct"] == pytest.approx(10.0) and sweep_table(v)["answer"] is None
