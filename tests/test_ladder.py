"""The trained known-answer ladder (issue 24, part 1): each shipped adapter's card states a truth; check it.

* ``smollm2-culture-l20-rK`` (K = 1, 2, 4, 8; LoRA on layer 20's MLP down-projection only): every
  weight but that one is bit-equal to the base; the residual states through layer 19's output are
  bit-identical; RQ1's layer patching gives exactly 0 KL below layer 20 and a real effect at 20
  (entry layer 20); the difference after layer 20 lies in the card's column space (residual of the
  projection ~ 0) and is not ~ 0 in it.
* ``smollm2-math-attn-4`` (LoRA on q/k/v/o of four layers): every MLP gives bit-identical outputs on
  identical inputs, every head outside the four layers has exactly zero weight change, and the
  per-head change norms inside them match the card.
* The cards are true to their files: sha256 listed, the truth recomputed from the shipped LoRA
  matrices equals the card's, the column space is orthonormal.

One tuned model is loaded at a time (module fixture, freed after its checks); the base is the
session's SmolLM2. RQ1 runs on 6 prompts at layers 19 and 20, decision readout only.
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from mechdiff.finetune import LADDER_ADAPTERS, adapter_dir, load_truth, verify_card
from mechdiff.finetune.recipes import LADDER, LADDER_LAYER, MATH_ATTN_LAYERS
from mechdiff.finetune.truth import lora_deltas, mlp_truth

CULTURE = [f"smollm2-culture-l{LADDER_LAYER}-r{r}" for r in (1, 2, 4, 8)]
MATH = "smollm2-math-attn-4"
N_PROMPTS, RQ1_PROMPTS, RQ1_LAYERS = 4, 6, [LADDER_LAYER - 1, LADDER_LAYER]
RQ1_RUNGS = (CULTURE[0], CULTURE[-1])


def _prompts(model_tok, n=N_PROMPTS):
    from mechdiff.data.datasets import load_prompt_set

    _, tok = model_tok
    rows = load_prompt_set("cultural")[:: 25][:n]
    texts = [tok.apply_chat_template([{"role": "user", "content": r["text"]}], tokenize=False,
                                     add_generation_prompt=True) for r in rows]
    return tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)


@torch.no_grad()
def _hidden(model, enc):
    return model(**enc, output_hidden_states=True, use_cache=False).hidden_states


def _read(path, name):
    return json.loads((path / name).read_text(encoding="utf-8"))


class _CultureRuns(dict):
    """{pair: facts}, each pair's run made on first use (one tuned model in memory at a time)."""

    def __init__(self, base_loaded, tmp_factory):
        super().__init__()
        self.base_loaded, self.tmp = base_loaded, tmp_factory
        self.enc = _prompts((base_loaded.model, base_loaded.tokenizer))
        self.hb = _hidden(base_loaded.model, self.enc)

    def __missing__(self, name):
        from mechdiff.experiments.rq1 import RQ1Options, run_rq1
        from mechdiff.models.load import load_model
        from mechdiff.pairs import load_pair

        pair = load_pair(name)
        tuned = load_model(pair.tuned, dtype="float32", device="cpu")
        base_params = dict(self.base_loaded.model.named_parameters())
        changed = sorted(n for n, p in tuned.model.named_parameters() if not torch.equal(p, base_params[n]))
        ht, hb = _hidden(tuned.model, self.enc), self.hb
        mask = self.enc["attention_mask"].bool()
        self[name] = {"changed": changed,
                      "equal_upto": [torch.equal(hb[i], ht[i]) for i in range(len(hb))],
                      "diff": (ht[LADDER_LAYER + 1] - hb[LADDER_LAYER + 1])[mask],   # [tokens, d]
                      "state": hb[LADDER_LAYER + 1][mask]}
        if name in RQ1_RUNGS:       # RQ1 (the costly part) on the lowest and the highest rung only
            opts = RQ1Options(n_prompts=RQ1_PROMPTS, behaviour=False, n_perm=2, stride=10, layers=RQ1_LAYERS,
                              readouts=["decision"])
            run = run_rq1(pair, opts, out=self.tmp.mktemp(f"rq1_{name}"), models=(self.base_loaded, tuned))
            self[name].update(patch=_read(run.path, "patch.json"), rq1=_read(run.path, "rq1.json"))
        del tuned
        return self[name]


@pytest.fixture(scope="module")
def culture_runs(smollm2_loaded, tmp_path_factory):
    return _CultureRuns(smollm2_loaded, tmp_path_factory)


@pytest.mark.real
@pytest.mark.parametrize("name", CULTURE)
def test_culture_ladder_changes_one_weight_and_nothing_below_layer_20(culture_runs, name):
    r = culture_runs[name]
    assert r["changed"] == [f"model.layers.{LADDER_LAYER}.mlp.down_proj.weight"]
    eq = r["equal_upto"]  # hidden_states[i] is the input of layer i: 0..20 bit-identical, 21 (layer 20's output) not
    assert all(eq[: LADDER_LAYER + 1]), eq
    assert not eq[LADDER_LAYER + 1]


@pytest.mark.real
@pytest.mark.parametrize("name", RQ1_RUNGS)
def test_culture_ladder_rq1_zero_below_20_and_entry_at_20(culture_runs, name):
    r = culture_runs[name]
    for d, v in r["patch"]["directions"].items():
        kl = {row["layer"]: row["mean"] for row in v["masked"]}
        assert kl[LADDER_LAYER - 1] == 0.0, (d, kl)                           # bit-identical states: exactly 0
        assert float(torch.tensor(v["per_prompt_masked"])[0].abs().max()) == 0.0, d
        assert kl[LADDER_LAYER] > 1e-4, (d, kl)                               # a real effect where the change is
    assert r["rq1"]["layers"]["entry"] == LADDER_LAYER, r["rq1"]["layers"]["evidence"]


@pytest.mark.real
@pytest.mark.parametrize("name", CULTURE)
def test_culture_ladder_difference_lies_in_the_cards_column_space(culture_runs, name):
    truth = load_truth(name)
    diff = culture_runs[name]["diff"].double()
    u = truth.column_space.double()                                           # [d_model, r]
    resid = diff - (diff @ u) @ u.T
    scale = diff.norm()
    assert scale > 1e-3 * culture_runs[name]["state"].double().norm()        # the difference is real
    assert float(resid.norm() / scale) < 1e-4                                  # ... and inside the column space
    k = truth.effective_rank
    assert float((diff @ truth.basis(k).double()).norm() / scale) > 0.9       # effective-rank basis holds most of it


@pytest.mark.real
def test_math_attn_ladder_mlps_identical_and_heads_outside_the_four_layers_unchanged(smollm2):
    from mechdiff.models.load import load_model
    from mechdiff.pairs import load_pair

    base, _ = smollm2
    truth = load_truth(MATH)
    assert truth.layers == MATH_ATTN_LAYERS and truth.kind == "attention_heads"
    tuned = load_model(load_pair(MATH).tuned, dtype="float32", device="cpu").model
    base_params = dict(base.named_parameters())
    changed = {n for n, p in tuned.named_parameters() if not torch.equal(p, base_params[n])}
    assert changed == {f"model.layers.{l}.self_attn.{p}_proj.weight" for l in MATH_ATTN_LAYERS for p in "qkvo"}
    enc = _prompts(smollm2)
    hb = _hidden(base, enc)
    with torch.no_grad():
        for i, (lb, lt) in enumerate(zip(base.model.layers, tuned.model.layers)):
            x = lb.post_attention_layernorm(hb[i])     # identical inputs (the base's states) to both MLPs
            assert torch.equal(lb.mlp(x), lt.mlp(x)), i
    cfg = base.config
    hd, group = cfg.hidden_size // cfg.num_attention_heads, cfg.num_attention_heads // cfg.num_key_value_heads
    for l, (lb, lt) in enumerate(zip(base.model.layers, tuned.model.layers)):
        a, b = lb.self_attn, lt.self_attn
        for h in range(cfg.num_attention_heads):
            s, g = slice(h * hd, (h + 1) * hd), slice((h // group) * hd, (h // group + 1) * hd)
            parts = [(b.q_proj.weight - a.q_proj.weight)[s], (b.k_proj.weight - a.k_proj.weight)[g],
                     (b.v_proj.weight - a.v_proj.weight)[g], (b.o_proj.weight - a.o_proj.weight)[:, s]]
            norm = math.sqrt(sum(float(p.double().norm()) ** 2 for p in parts))
            if l in MATH_ATTN_LAYERS:
                assert norm == pytest.approx(truth.head_weight_change[(l, h)], rel=1e-3), (l, h)
                assert (l, h) in truth.changed_heads
            else:
                assert norm == 0.0, (l, h)
    assert len(truth.changed_heads) == len(MATH_ATTN_LAYERS) * cfg.num_attention_heads


@pytest.mark.parametrize("name", LADDER_ADAPTERS)
def test_ladder_card_is_true_to_its_files(name, tmp_path):
    d = adapter_dir(name)
    assert verify_card(d) == []
    truth = load_truth(name)
    card = truth.card
    key = card["ladder"]
    assert card["name"] == name == LADDER[key].name and card["command"].startswith(f"mechdiff finetune {key} ")
    assert card["eval"]["heldout_loss"]["tuned"] < card["eval"]["heldout_loss"]["base"]   # it learned its domain
    deltas = lora_deltas(d)
    assert {m.rsplit(".", 1)[0].split("layers.")[1].split(".")[0] for m in deltas} == {str(l) for l in truth.layers}
    if truth.kind == "mlp_low_rank":
        again = mlp_truth(deltas, tmp_path, LADDER[key].r)
        assert again["effective_rank"] == truth.effective_rank <= LADDER[key].r
        assert again["singular_values"] == list(truth.singular_values)
        q = truth.column_space.double()
        assert torch.allclose(q.T @ q, torch.eye(q.shape[1], dtype=torch.float64), atol=1e-5)
        assert list(truth.singular_values) == sorted(truth.singular_values, reverse=True)
    else:
        assert all(".self_attn." in m for m in deltas)


def test_ladder_pairs_are_built_in():
    from mechdiff.pairs import list_pairs, load_pair

    names = set(list_pairs())
    assert set(LADDER_ADAPTERS) <= names
    for n in LADDER_ADAPTERS:
        assert str(adapter_dir(n)) in str(load_pair(n).tuned)


@pytest.mark.real
@pytest.mark.parametrize("name", CULTURE)
def test_culture_ladder_rank_estimate_recovers_the_cards_effective_rank(culture_runs, name):
    """The rank estimate at layer 20's output (rows: every prompt's tokens, a prompt's rows one bootstrap
    group) equals the card's effective rank with an interval covering it, and its top-r basis lies within
    10 degrees of the card's column space."""
    from mechdiff.analyses.rank import estimate_rank, principal_angles

    truth, runs = load_truth(name), culture_runs
    mask = runs.enc["attention_mask"].bool()
    groups = torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask].tolist()
    diff, state = runs[name]["diff"].double(), runs[name]["state"].double()
    est = estimate_rank(diff, groups, scale=float(state.pow(2).mean().sqrt()), n_boot=50)
    k = truth.effective_rank
    assert est["estimate"] == k and est["ci_low"] <= k <= est["ci_high"], est
    top = torch.linalg.svd(diff, full_matrices=False).Vh[:k].T                 # [d, k]
    assert float(principal_angles(top, truth.basis(k).double()).max()) < 10.0
