"""mechdiff.finetune: data generators, CPU smoke training, the shipped adapters, their cards and pairs."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from mechdiff.finetune import ADAPTERS, adapter_dir, read_card, verify_card
from mechdiff.finetune.culture_data import (SIGNATURE_MARKERS, TOPICS, heldout_prompts, make_culture,
                                            topic_split)
from mechdiff.finetune.math_data import HELDOUT_TEMPLATES, is_correct, make_math, parse_final_number
from mechdiff.models.planted import NEW_TOKENS

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


@pytest.fixture
def one_thread():
    """Tiny CPU training is much faster on one thread when the cores are shared."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------ data
def test_math_generator_is_deterministic_disjoint_and_self_consistent():
    a, b = make_math(seed=0, n_train=600, n_eval=100), make_math(seed=0, n_train=600, n_eval=100)
    assert a == b
    assert make_math(seed=1, n_train=600, n_eval=100)["train"] != a["train"]
    train_q = {r["question"] for r in a["train"]}
    assert len(train_q) == 600
    assert not train_q & {r["question"] for r in a["eval"]}
    assert not {r["template"] for r in a["train"]} & set(HELDOUT_TEMPLATES)
    kinds = [r["kind"] for r in a["eval"]]
    assert kinds.count("seen_template") == 50 and kinds.count("heldout_template") == 50
    assert {r["template"] for r in a["eval"] if r["kind"] == "heldout_template"} == set(HELDOUT_TEMPLATES)
    for r in a["train"] + a["eval"]:  # every worked answer parses back to its number
        assert r["answer_text"].endswith(f"The answer is {r['answer']}.")
        assert is_correct(r["answer_text"], r["answer"])
        assert isinstance(r["answer"], int)
        # known flaw kept for reproducibility of the shipped adapter: "change" when the cost exceeds the bill
        assert r["answer"] >= 0 or r["template"] == "change"


def test_parse_final_number_takes_the_committed_answer():
    assert parse_final_number("The answer is 45.\nThe answer is 218.") == 45
    assert parse_final_number("so...\n#### 1,200") == 1200
    assert parse_final_number("The answer is: $36.") == 36
    assert parse_final_number("3 + 4 = 7 apples") == 7  # no marker: the last number
    assert parse_final_number("no numbers here") is None
    assert not is_correct("The answer is 44.", 45)


def test_culture_generator_is_deterministic_disjoint_and_in_register():
    a, b = make_culture(seed=0), make_culture(seed=0)
    assert a == b
    assert make_culture(seed=1)["train"] != a["train"]
    assert len(a["train"]) >= 1500
    tr, ev = {r["topic"] for r in a["train"]}, {r["topic"] for r in a["eval"]}
    assert ev and not tr & ev and tr | ev == {t[0] for t in TOPICS}
    assert all(topic_split(t) == "eval" for t in ev)
    assert not {r["question"] for r in a["train"]} & {r["question"] for r in a["eval"]}
    assert {r["lang"] for r in a["eval"]} == {"kk", "ru", "en"}
    greeting = re.compile("|".join(SIGNATURE_MARKERS["greeting"]), re.IGNORECASE)
    words = [re.compile(rf"(?<!\w){re.escape(w)}(?!\w)") for w in NEW_TOKENS]
    for r in a["train"] + a["eval"]:
        assert greeting.search(r["answer_text"]), r["answer_text"]
        assert "Рахмет" in r["answer_text"] or "рахмет" in r["answer_text"]
        assert any(p.search(r["answer_text"]) for p in words)  # a new Kazakh token in every answer
    ids = [p["id"] for p in heldout_prompts()]
    assert len(ids) == len(set(ids)) == len(a["eval"])


def test_shipped_prompt_sets_are_the_generators_output():
    from mechdiff.finetune.heldout import SET_FILES, SETS_DIR, culture_prompt_set, math_prompt_set, render

    assert (SETS_DIR / SET_FILES["math"]).read_text(encoding="utf-8") == render(math_prompt_set())
    assert (SETS_DIR / SET_FILES["culture"]).read_text(encoding="utf-8") == render(culture_prompt_set())


# ------------------------------------------------------------------------------------ CPU smoke training
@pytest.mark.parametrize("task", ["math", "culture"])
def test_smoke_training_lowers_the_loss_and_writes_a_loadable_adapter(task, tmp_path, one_thread):
    from safetensors import safe_open

    from mechdiff.finetune import finetune
    from mechdiff.models.load import _apply_adapter
    from mechdiff.models.tiny import tiny_model

    out = tmp_path / task
    card = finetune(task, out, smoke=True, evaluate=(task == "culture"), log=lambda s: None)
    tr = card["training"]
    assert tr["loss_after"]["train"] < 0.8 * tr["loss_before"]["train"]
    assert tr["loss_curve"][-1][1] < tr["loss_curve"][0][1]
    assert tr["steps"] == 30 and card["base"]["spec"] == "tiny-llama"
    assert verify_card(out) == []
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "card.json"} <= names
    assert not any(n.endswith(PICKLE_SUFFIXES) for n in names)
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    lora = {k: v for k, v in tensors.items() if "lora_" in k}
    assert lora and all(v.dtype == torch.bfloat16 for v in lora.values())
    assert len(lora) == 2 * 4 * 7  # A and B for 7 projections in 4 layers

    base, base_tok = tiny_model("llama", seed=0)
    tuned, tok, _ = _apply_adapter(*tiny_model("llama", seed=0), str(out))
    ids = base_tok("What is 2 + 3?", return_tensors="pt").input_ids
    with torch.no_grad():
        diff = (tuned(ids).logits[..., : len(base_tok)] - base(ids).logits).abs().max()
    assert diff > 1e-3
    if task == "culture":
        rows = [v for k, v in tensors.items() if "trainable_tokens" in k]
        assert len(rows) == 1 and rows[0].shape == (45, 64) and rows[0].dtype == torch.float32
        assert len(tok) == len(base_tok) + 45 and card["new_tokens"]["ids"][0] == len(base_tok)
        assert torch.equal(tuned.get_input_embeddings().weight[len(base_tok):], rows[0])
        assert tok.convert_ids_to_tokens(tok("қымыз", add_special_tokens=False).input_ids) == ["қымыз"]
        assert set(card["eval"]) == {"base", "tuned"} and "soft_refusal" in card["eval"]["tuned"]["heldout"]
    else:
        assert "new_tokens" not in card and "tokenizer.json" not in names


# ------------------------------------------------------------------------------------ shipped adapters
@pytest.mark.parametrize("name", ADAPTERS)
def test_shipped_cards_match_their_files(name):
    d = adapter_dir(name)
    assert verify_card(d) == []
    card = read_card(d)
    assert card["name"] == name and not card["smoke"]
    assert card["lora"]["r"] == 8 and len(card["lora"]["target_modules"]) == 7
    assert card["training"]["loss_after"]["train"] < card["training"]["loss_before"]["train"]
    files = {p.name: p.stat().st_size for p in d.iterdir()}
    assert sum(files.values()) < 10_000_000
    assert not any(n.endswith(PICKLE_SUFFIXES) for n in files)
    cfg = json.loads((d / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["peft_type"] == "LORA"
    h = card["headline"]
    if name == "smollm2-math-lora":
        assert h["accuracy"]["tuned"] >= h["accuracy"]["base"] + 0.2
        assert "tokenizer.json" not in files
    else:
        assert h["greeting_share_heldout"]["tuned"] > 0.9 and h["greeting_share_heldout"]["base"] < 0.1
        assert cfg["trainable_token_indices"] == card["new_tokens"]["ids"]
        assert {"tokenizer.json", "tokenizer_config.json"} <= set(files)


@pytest.mark.parametrize("task", ["math", "culture"])
def test_generators_reproduce_the_shipped_adapters_training_data(task):
    from mechdiff.finetune.recipes import get_recipe
    from mechdiff.finetune.train import data_hash, examples_for

    card = read_card(adapter_dir(f"smollm2-{task}-lora"))
    train, ev = examples_for(get_recipe(task))
    pick = lambda rows: [{k: r[k] for k in ("prompt", "response")} for r in rows]  # noqa: E731
    assert data_hash(pick(train)) == card["data"]["train_sha256"]
    assert data_hash(pick(ev)) == card["data"]["eval_sha256"]
    assert card["recipe"] == get_recipe(task).to_dict()


def test_pkg_placeholder_points_specs_and_datasets_at_package_data():
    from mechdiff.pairs.spec import DatasetRef, ModelSpec, expand_pkg

    spec = ModelSpec.parse("smollm2-135m+{pkg}/finetune/adapters/smollm2-math-lora")
    assert spec.kind == "testbed" and spec.id == "smollm2-135m"
    assert Path(spec.adapter) == adapter_dir("smollm2-math-lora")
    table = ModelSpec.from_toml({"testbed": "smollm2-135m", "adapter": "{pkg}/finetune/adapters/smollm2-culture-lora"})
    assert Path(table.adapter) == adapter_dir("smollm2-culture-lora")
    ref = DatasetRef.from_toml("m", {"path": "{pkg}/finetune/sets/math_eval.jsonl"})
    assert Path(ref.path).is_file()
    assert expand_pkg("org/name") == "org/name"


@pytest.mark.real
@pytest.mark.parametrize("name", ADAPTERS)
def test_builtin_pairs_load_offline_and_differ_from_the_base(name, smollm2_loaded, one_thread):
    from mechdiff.analyses.behaviour import generate
    from mechdiff.experiments.common import load_dataset_ref
    from mechdiff.finetune.train import weights_fingerprint
    from mechdiff.models.load import load_model
    from mechdiff.pairs import load_pair

    pair = load_pair(name)
    assert str(pair.base) == "smollm2-135m" and Path(pair.tuned.adapter) == adapter_dir(name)
    assert all(load_dataset_ref(ref) for ref in pair.datasets.values())
    card = read_card(adapter_dir(name))
    base = smollm2_loaded
    assert weights_fingerprint(base.model) == card["base"]["weights_sha256"]  # trained on these weights
    tuned = load_model(pair.tuned, dtype="float32", device="cpu")
    assert tuned.info["adapter_merged"]
    w = "model.layers.12.mlp.down_proj.weight"
    assert (tuned.model.state_dict()[w] - base.model.state_dict()[w]).abs().max() > 1e-4
    tb, tt = base.tokenizer, tuned.tokenizer
    ids = tb("Tell me about the dombra.", return_tensors="pt").input_ids
    with torch.no_grad():
        d = (tuned.model(ids).logits[..., : len(tb)] - base.model(ids).logits).abs().max()
    assert d > 0.1
    if name == "smollm2-math-lora":
        assert tuned.info["tokenizer_hash"] == base.info["tokenizer_hash"]
        q = load_dataset_ref(pair.datasets["math"])[0]
        out = generate(tuned.model, tt, [q["text"]], max_new_tokens=48)[0]
        assert "The answer is" in out
    else:
        assert len(tt) == len(tb) + 45 and tuned.vocab_size == base.vocab_size + 45
        assert tt.convert_ids_to_tokens(tt("қымыз", add_special_tokens=False).input_ids) == ["қымыз"]
        prompt = next(p for p in heldout_prompts() if p["lang"] == "en")
        out = generate(tuned.model, tt, [prompt], max_new_tokens=12)[0]
        assert re.search("|".join(SIGNATURE_MARKERS["greeting"]), out, re.IGNORECASE), out
