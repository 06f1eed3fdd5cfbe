"""Known-answer tests of the RQ1 runner (fairness, CKA, layer patching, layer choice, resume).

Ground truth (mechdiff.models.planted): planted-cultural = SmolLM2-135M with a rank-2 update of
mlp.down_proj at layers 20, 22, 24 (of 30) and 45 added Kazakh tokens; layers 0..19 are bit-identical.
So at the decision token:
  * residual states after layers 0..19 are identical      -> debiased CKA 1, patch KL 0;
  * after layer 20 they differ (on cultural prompts)       -> CKA < 1, patch KL > 0 from layer 20 on.
A model against itself must give CKA 1 and KL 0 everywhere; SmolLM2 vs Gemma3 cannot be patched
(different widths and depths) but gets a fairness report and a cross-depth CKA matrix.
"""
from __future__ import annotations

import json
import re
import time

import pytest
import torch

from mechdiff.errors import ConfigError, DataError

PLANTED = (20, 22, 24)
FIRST = PLANTED[0]
N_LAYERS = 30
BASE_VOCAB, N_NEW = 49152, 45


def _read(path, name):
    return json.loads((path / name).read_text(encoding="utf-8"))


# ================================================================ planted-cultural
@pytest.fixture(scope="module")
def rq1_planted(planted_rq1):
    path, opts, pair, secs = planted_rq1
    return {"path": path, "opts": opts, "pair": pair, "seconds": secs,
            "rq1": _read(path, "rq1.json"), "cka": _read(path, "cka.json"),
            "patch": _read(path, "patch.json"), "fairness": _read(path, "fairness.json")}


@pytest.mark.real
def test_planted_cka_is_one_before_the_change_and_drops_after(rq1_planted):
    from mechdiff.experiments.rq1 import cka_layers

    rows = rq1_planted["cka"]["per_layer"]
    assert [r["layer"] for r in rows] == cka_layers(N_LAYERS, 2) == [1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21,
                                                                    23, 25, 27, 29]
    assert rq1_planted["cka"]["n"] == 32
    for r in rows:
        if r["layer"] < FIRST:
            assert r["debiased"] >= 0.999, r
        else:  # layer 21 and later: after the first planted layer
            assert r["debiased"] < 0.995, r
    # the full matrix has the same diagonal as the per-layer curve
    m = rq1_planted["cka"]["matrix_debiased"]
    assert len(m) == len(m[0]) == len(rows)
    for i, r in enumerate(rows):
        assert m[i][i] == pytest.approx(r["debiased"], abs=1e-6)


@pytest.mark.real
def test_planted_patch_kl_is_zero_before_the_change_and_large_at_it(rq1_planted):
    patch = rq1_planted["patch"]
    assert patch["layers"] == list(range(N_LAYERS))
    assert set(patch["directions"]) == {"base->tuned", "tuned->base"}
    for d, v in patch["directions"].items():
        per_prompt = torch.tensor(v["per_prompt_masked"])          # [layers, N]
        assert per_prompt.shape == (N_LAYERS, 32)
        for j, row in enumerate(v["masked"]):
            assert row["layer"] == j
            if j < FIRST:
                assert float(per_prompt[j].abs().max()) < 1e-5, (d, j, row)
                assert v["unmasked"][j]["mean"] < 1e-5, (d, j)
        assert v["masked"][FIRST]["mean"] > 0.05, (d, v["masked"][FIRST])
        assert v["masked"][FIRST - 1]["mean"] < 1e-5


@pytest.mark.real
def test_planted_layer_choice_and_control(rq1_planted):
    rq1 = rq1_planted["rq1"]
    layers = rq1["layers"]
    assert FIRST in layers["chosen"], layers
    assert rq1["planted_layers"] == list(PLANTED)
    ctrl = layers["control"]
    assert ctrl is not None and 0 < ctrl < FIRST and ctrl not in layers["chosen"]
    kl = [row["mean"] for v in rq1_planted["patch"]["directions"].values() for row in v["masked"]
          if row["layer"] == ctrl]
    assert len(kl) == 2 and max(kl) < 1e-5
    assert rq1["headline"]["control layer KL (max dir)"] < 1e-5
    assert rq1["headline"]["chosen layers"] == layers["chosen"]


@pytest.mark.real
def test_planted_entry_layer_is_the_first_planted_layer_above_an_exact_floor(rq1_planted):
    """The entry layer is the first layer whose KL exceeds the self-patch floor (exactly 0) by 2 SE;
    the chosen layers follow the stated rule (entry, steepest rise, peak) at or after it."""
    layers = rq1_planted["rq1"]["layers"]
    assert layers["entry"] == FIRST, layers["evidence"]
    assert layers["evidence"]["floor"] == 0.0
    assert min(layers["chosen"]) == FIRST and max(layers["chosen"]) < N_LAYERS - 1
    for v in rq1_planted["patch"]["directions"].values():
        assert v["floor"]["max"] == 0.0            # the destination's own state written back: exactly 0
    assert "enters at" in " ".join(rq1_planted["rq1"]["headline"])


@pytest.mark.real
def test_planted_both_readouts_and_the_gap_closed(rq1_planted):
    """Both readouts are reported. Read at the patched token, patching the final residual closes the
    whole gap (the destination then outputs the source's distribution there); read at the first reply
    token it closes none (the last layer's state at an earlier position reaches no later position).
    Patching below the change closes none of it at either readout."""
    patch = rq1_planted["patch"]
    assert set(patch["readouts"]) == {"decision", "last"}
    for m, r in patch["readouts"].items():
        for d, v in r["directions"].items():
            share = {x["layer"]: x["share"] for x in v["gap_closed"]}
            assert share[N_LAYERS - 1] == pytest.approx(1.0 if m == "decision" else 0.0, abs=1e-3), (m, d)
            assert all(abs(share[l]) < 1e-6 for l in range(FIRST)), (m, d)
            assert v["meaning"].startswith("the " + d.split("->")[0])


@pytest.mark.real
def test_planted_fairness_report(rq1_planted, planted_cultural):
    fair = rq1_planted["fairness"]
    v = fair["vocab"]
    assert v["vocab_a"] == BASE_VOCAB and v["vocab_b"] == BASE_VOCAB + N_NEW == 49197
    assert v["pct_increase"] == pytest.approx(100 * N_NEW / BASE_VOCAB, abs=1e-12)  # 0.091552734375
    # Every base token keeps its id in the tuned tokenizer; only the unknown token (<|endoftext|>,
    # id 0) is left out of the shared vocabulary by design, and none of the 45 new words is shared.
    base = planted_cultural[0]
    assert base.tokenizer.unk_token_id == 0
    assert v["shared"] == BASE_VOCAB - 1 == 49151
    assert v["duplicates_a"] == v["duplicates_b"] == 0
    assert fair["n_used"] == 32 and len(fair["prompt_ids"]) == 32 == len(set(fair["prompt_ids"]))
    # The strict filter (ratio 1.0) keeps exactly the prompts that no added token touches: the tuned
    # tokenizer gives them the base tokenizer's ids; every dropped prompt uses an added token.
    from mechdiff.data.datasets import load_prompt_set

    base, tuned, _ = planted_cultural
    rows = load_prompt_set("cultural")
    assert fair["filter"]["total"] == len(rows)
    texts = [r["text"] for r in rows]
    ids_b = base.tokenizer(texts, add_special_tokens=False)["input_ids"]
    ids_t = tuned.tokenizer(texts, add_special_tokens=False)["input_ids"]
    clean = [a == b and max(b) < BASE_VOCAB for a, b in zip(ids_b, ids_t)]
    assert fair["filter"]["kept"] == sum(clean) < len(rows)
    from mechdiff.experiments.steps import group_of, stratified
    kept_rows = [r for r, ok in zip(rows, clean) if ok]
    assert fair["prompt_ids"] == [r["id"] for r in stratified(kept_rows, 32, seed=0)]
    # stratified by topic and language: 32 prompts cover many topics, not the first few in file order
    used = [r for r in kept_rows if r["id"] in set(fair["prompt_ids"])]
    assert len({group_of(r) for r in used}) >= min(16, len({group_of(r) for r in kept_rows}))
    head = rq1_planted["rq1"]["headline"]
    assert head["vocab base / tuned"] == "49152 / 49197" and head["shared tokens"] == 49151


@pytest.mark.real
def test_planted_figures_and_report_exist(rq1_planted):
    p = rq1_planted["path"]
    for f in ("cka_curve.png", "cka_matrix.png", "patch_kl.png"):
        fig = p / "figures" / f
        assert fig.is_file() and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f
    html = (p / "report.html").read_text(encoding="utf-8")
    assert "RQ1" in html and "49197" in html
    assert (p / "report.md").is_file()


@pytest.mark.real
def test_planted_rerun_skips_every_step_and_other_options_are_refused(rq1_planted, planted_cultural):
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1

    p, opts, pair = rq1_planted["path"], rq1_planted["opts"], rq1_planted["pair"]
    base, tuned, _ = planted_cultural
    before = _read(p, "steps.json")["steps"]
    assert {"rq1.capture", "rq1.cka", "rq1.patch"} <= set(before)
    t0 = time.perf_counter()
    run_rq1(pair, RQ1Options(**vars(opts)), out=p, models=(base, tuned))
    rerun = time.perf_counter() - t0
    after = _read(p, "steps.json")["steps"]
    assert after == before  # same records: no step re-ran ("finished" timestamps unchanged)
    assert rerun < 0.5 * rq1_planted["seconds"], (rerun, rq1_planted["seconds"])
    assert len(_read(p, "manifest.json")["resumes"]) >= 1
    with pytest.raises(ConfigError, match="other options"):
        run_rq1(pair, RQ1Options(**{**vars(opts), "n_prompts": 24}), out=p, models=(base, tuned))
    assert _read(p, "steps.json")["steps"] == before


# ================================================================ a model against itself
@pytest.mark.real
def test_self_pair_cka_one_and_kl_zero_everywhere(smollm2_loaded, tmp_path_factory):
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1
    from mechdiff.pairs import load_pair

    pair = load_pair("smollm2-self")
    out = tmp_path_factory.mktemp("rq1_self")
    run_rq1(pair, RQ1Options(n_prompts=16, stride=1, behaviour=False, n_perm=5), out=out,
            models=(smollm2_loaded, smollm2_loaded))
    cka, patch = _read(out, "cka.json"), _read(out, "patch.json")
    assert [r["layer"] for r in cka["per_layer"]] == list(range(N_LAYERS))
    for r in cka["per_layer"]:
        assert r["debiased"] == pytest.approx(1.0, abs=1e-6), r
        assert r["biased"] == pytest.approx(1.0, abs=1e-6), r
    m = torch.tensor(cka["matrix_debiased"])
    assert torch.allclose(m.diagonal(), torch.ones(N_LAYERS, dtype=m.dtype), atol=1e-6)
    assert patch["layers"] == list(range(N_LAYERS))
    for d, v in patch["directions"].items():
        per_prompt = torch.tensor(v["per_prompt_masked"])
        assert per_prompt.shape == (N_LAYERS, 16)
        assert float(per_prompt.abs().max()) < 1e-6, d
        assert max(abs(r["mean"]) for r in v["unmasked"]) < 1e-6, d
    layers = _read(out, "rq1.json")["layers"]
    assert layers["entry"] is None and layers["chosen"] == [], layers   # no divergence found
    assert _read(out, "rq1.json")["headline"]["divergence enters at"] == "no divergence found"
    assert all(x["share"] is None for x in patch["directions"]["base->tuned"]["gap_closed"])  # no gap
    fair = _read(out, "fairness.json")["vocab"]
    assert fair["vocab_a"] == fair["vocab_b"] == BASE_VOCAB and fair["pct_increase"] == 0
    assert fair["shared"] == BASE_VOCAB - 1  # all but the unknown token


# ================================================================ SmolLM2 vs Gemma3
@pytest.fixture(scope="module")
def gemma_pair():
    """(pair, base, tuned) for smollm2-vs-gemma3 (Gemma3 de-quantises into the cache on first use)."""
    from mechdiff.experiments.common import open_models
    from mechdiff.pairs import load_pair

    pair = load_pair("smollm2-vs-gemma3")
    base, tuned = open_models(pair, device="cpu")
    return pair, base, tuned


@pytest.fixture(scope="module")
def gemma_rq1(gemma_pair, tmp_path_factory):
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1

    pair, base, tuned = gemma_pair
    out = tmp_path_factory.mktemp("rq1_gemma")
    run_rq1(pair, RQ1Options(n_prompts=16, min_shared_ratio=0.65, behaviour=False, n_perm=5), out=out,
            models=(base, tuned))
    return out


@pytest.mark.real
def test_gemma_fairness_report(gemma_rq1):
    fair = _read(gemma_rq1, "fairness.json")
    v = fair["vocab"]
    assert v["vocab_a"] == 49152 and v["vocab_b"] == 262144
    assert v["pct_increase"] == pytest.approx((262144 - 49152) / 49152 * 100, rel=1e-12)
    assert 0 < v["shared"] < 49152
    assert fair["min_shared_ratio"] == 0.65 and 0 < fair["n_used"] <= 16
    assert fair["filter"]["min_shared_ratio"] == 0.65


@pytest.mark.real
def test_gemma_cka_matrix_shape_and_no_patching(gemma_rq1, gemma_pair):
    from mechdiff.experiments.rq1 import cka_layers

    _, base, tuned = gemma_pair
    assert (base.n_layers, base.d_model) == (30, 576) and (tuned.n_layers, tuned.d_model) == (18, 640)
    cka = _read(gemma_rq1, "cka.json")
    lb, lt = cka_layers(30, 2), cka_layers(18, 2)
    assert cka["matrix_layers"] == {"base": lb, "tuned": lt}
    for key in ("matrix_debiased", "matrix_biased"):
        m = cka[key]
        assert len(m) == len(lb) == 15 and all(len(row) == len(lt) == 9 for row in m), key
        assert all(-1.01 <= x <= 1.01 for row in m for x in row)
    assert "per_layer" not in cka  # depths differ: no same-layer curve
    assert not (gemma_rq1 / "patch.json").exists()
    rq1 = _read(gemma_rq1, "rq1.json")
    assert rq1["patch"] is None
    msg = rq1["headline"]["patching"]
    assert msg.startswith("skipped") and "d=576" in msg and "d=640" in msg
    assert (gemma_rq1 / "figures" / "cka_matrix.png").is_file()
    assert not (gemma_rq1 / "figures" / "patch_kl.png").exists()


@pytest.mark.real
def test_gemma_strict_filter_names_a_ratio_to_try(gemma_pair, tmp_path_factory):
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1
    from mechdiff.fairness import filter_prompts, shared_vocab

    pair, base, tuned = gemma_pair
    d = tmp_path_factory.mktemp("rq1_gemma_strict")
    rows = [{"id": f"kk-{i}", "text": t} for i, t in enumerate((
        "Наурыз мейрамында біз дастархан жайып, қонақтарды күтеміз.",
        "Қымыз — жылқының сүтінен жасалған дәстүрлі қазақ сусыны.",
        "Домбыра — қазақ халқының ең сүйікті музыкалық аспабы.",
        "Абай Құнанбайұлы — қазақтың ұлы ақыны және ойшылы."))]
    prompts = d / "kk.jsonl"
    prompts.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(DataError) as e:
        run_rq1(pair, RQ1Options(n_prompts=4, min_shared_ratio=1.0, behaviour=False),
                out=d / "run", models=(base, tuned), prompts=str(prompts))
    msg = str(e.value)
    assert "0/4 prompts" in msg
    m = re.search(r"Try --min_shared_ratio (\d\.\d\d)", msg)
    assert m, msg
    ratio = float(m.group(1))
    assert 0 < ratio < 1
    assert not (d / "run" / "tensors").exists()  # failed before any capture
    # the suggested ratio really keeps at least one prompt
    sv = shared_vocab(base.tokenizer, tuned.tokenizer)
    kept, _ = filter_prompts(rows, base.tokenizer, tuned.tokenizer, sv, ratio)
    assert len(kept) >= 1


@pytest.mark.real
def test_self_pair_standardised_patch_is_still_zero(smollm2_loaded, tmp_path_factory):
    """Standardising a model's states onto its own statistics is the identity: KL stays 0."""
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1
    from mechdiff.pairs import load_pair

    out = tmp_path_factory.mktemp("rq1_self_std")
    run_rq1(load_pair("smollm2-self"), RQ1Options(n_prompts=8, behaviour=False, n_perm=2, standardise=True,
                                                  layers=[5, 20]), out=out,
            models=(smollm2_loaded, smollm2_loaded))
    patch = _read(out, "patch.json")
    for d, v in patch["directions"].items():
        assert float(torch.tensor(v["per_prompt_masked"]).abs().max()) == 0.0, d     # exactly the no-op value
    assert patch["standardise"]["skipped_bit_equal_layers"] == [5, 20]


@pytest.mark.real
def test_planted_standardised_patch_is_exactly_zero_at_bit_equal_layers(planted_cultural, tmp_path_factory):
    """--standardise on planted-cultural: below the planted layer base and tuned states are bit-equal, so
    standardisation is skipped there and KL is exactly 0 (said in patch.json and the headline); at and after
    the planted layer it applies and the KL is positive."""
    from mechdiff.experiments.rq1 import RQ1Options, run_rq1
    from mechdiff.pairs import load_pair

    base, tuned, _ = planted_cultural
    out = tmp_path_factory.mktemp("rq1_planted_std")
    layers = [5, FIRST - 1, FIRST, PLANTED[-1]]
    run_rq1(load_pair("planted-cultural"), RQ1Options(n_prompts=8, behaviour=False, n_perm=2, standardise=True,
                                                      layers=layers, readouts=["decision"]),
            out=out, models=(base, tuned))
    patch = _read(out, "patch.json")
    assert patch["standardise"]["skipped_bit_equal_layers"] == [5, FIRST - 1]
    assert patch["standardise"]["applied_layers"] == [FIRST, PLANTED[-1]]
    for d, v in patch["directions"].items():
        kl = torch.tensor(v["per_prompt_masked"])                     # [layers, prompts]
        assert torch.equal(kl[:2], torch.zeros_like(kl[:2])), d       # bit-equal layers: exactly 0
        assert float(kl[3].mean()) > 0, d
        assert [x["mean"] for x in v["unmasked"]][:2] == [0.0, 0.0], d
    headline = _read(out, "rq1.json")["headline"]
    assert "skipped at the bit-equal layers [5, 19]" in headline["standardised"]


@pytest.mark.real
def test_planted_cognitive_entry_layer_is_its_first_planted_layer(planted_cognitive, tmp_path):
    """Issue 11: on the second planted pair too, divergence enters at the first planted layer (0):
    patching layer 0 already moves the readout above the exact self-patch floor."""
    from mechdiff.experiments.stage import run_stage
    from mechdiff.pairs import load_pair
    base, tuned, truth = planted_cognitive
    first = min(truth["layers"])
    run = run_stage("rq1", load_pair("planted-cognitive"), out=tmp_path, models=(base, tuned), n_prompts=8,
                    layers=[first, first + 2, 14, 28], behaviour=False, n_perm=2, readouts=["decision"])
    layers = run.read_json("rq1.json")["layers"]
    assert first == 0 and layers["entry"] == first, layers["evidence"]
    assert layers["evidence"]["floor"] == 0.0
