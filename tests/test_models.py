import json

import pytest
import torch

from mechdiff.errors import ConfigError, ModelLoadError
from mechdiff.models.load import chat_template_hash, load_model, resolve_dtype, tokenizer_hash
from mechdiff.pairs import ModelSpec


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<unk>", "<eos>"] + [f"w{i}" for i in range(62)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>")


@pytest.fixture
def tiny_llama_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    d = tmp_path / "tiny-llama"
    model.save_pretrained(d)
    _tiny_tokenizer().save_pretrained(d)
    return d, model


def test_offline_uncached_hub_id_fails_at_once(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as e:
        load_model("mechdiff-test/definitely-not-cached-model@main", device="cpu")
    msg = str(e.value)
    assert "not in the local cache" in msg and "unreachable" in msg
    assert "--base" in msg and ".gguf" in msg and "HF_HOME" in msg


def test_offline_uncached_adapter_fails(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, _ = tiny_llama_dir
    with pytest.raises(ModelLoadError, match="not in the local cache"):
        load_model(f"{d}+mechdiff-test/no-such-lora", device="cpu")


def test_missing_local_paths_give_clear_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelSpec(kind="local", path=str(tmp_path / "nope")), device="cpu")
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path), device="cpu")
    with pytest.raises(ModelLoadError, match="GGUF file .* does not exist"):
        load_model(str(tmp_path / "model.gguf"), device="cpu")


def test_local_dir_load_and_info(tiny_llama_dir):
    d, ref = tiny_llama_dir
    lm = load_model(str(d), dtype="float32", device="cpu")
    assert not lm.model.training and lm.tokenizer.padding_side == "left"
    assert lm.tokenizer.pad_token is not None and lm.tokenizer.is_fast
    assert (lm.n_layers, lm.d_model, lm.vocab_size) == (2, 32, 64)
    info = lm.info
    for key in ("source", "config_hash", "tokenizer_hash", "chat_template_hash", "dtype", "n_layers", "d_model"):
        assert key in info
    assert info["dtype"] == "float32" and info["source"].startswith("local:")
    json.dumps(info)
    ids = torch.tensor([[3, 4, 5]])
    assert torch.equal(lm.model(ids).logits, ref(ids).logits)
    assert lm.info["tokenizer_hash"] == tokenizer_hash(lm.tokenizer)
    assert chat_template_hash(lm.tokenizer) is None


def test_resolve_dtype():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.bfloat16
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


def test_peft_adapter_spec_loads_and_merges(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    d, base = tiny_llama_dir
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                                 init_lora_weights=False))
    adir = tmp_path / "lora"
    peft_model.save_pretrained(adir)
    ids = torch.tensor([[3, 4, 5, 6]])
    with torch.no_grad():
        want = peft_model(input_ids=ids).logits
        plain = peft_model.get_base_model()
    lm = load_model(f"{d}+{adir}", dtype="float32", device="cpu")
    assert lm.spec.adapter == str(adir) and lm.info["adapter_merged"]
    assert not isinstance(lm.model, PeftModel)
    assert not any("lora" in n for n, _ in lm.model.named_parameters())
    with torch.no_grad():
        got = lm.model(input_ids=ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    fresh = load_model(str(d), dtype="float32", device="cpu")
    assert not torch.allclose(fresh.model(input_ids=ids).logits, got)
    del plain


def test_tokenizer_hash_sees_vocab_changes():
    a, b = _tiny_tokenizer(), _tiny_tokenizer()
    assert tokenizer_hash(a) == tokenizer_hash(b)
    b.padding_side = "right"
    assert tokenizer_hash(a) == tokenizer_hash(b)
    b.add_tokens(["brandnew"])
    assert tokenizer_hash(a) != tokenizer_hash(b)


@pytest.mark.real
def test_smollm2_testbed_loads(smollm2_loaded):
    lm = smollm2_loaded
    assert (lm.n_layers, lm.d_model, lm.vocab_size) == (30, 576, 49152)
    assert len(lm.tokenizer) == 49152 and lm.info["tied_embeddings"]
    assert lm.info["chat_template_hash"] is not None and lm.info["architecture"] == "LlamaForCausalLM"
    assert lm.tokenizer.padding_side == "left"


@pytest.mark.real
def test_smollm2_cache_matches_gguf_load(smollm2_loaded):
    """The cached safetensors copy gives exactly the logits of a direct GGUF load."""
    from mechdiff.models.testbed import gguf_source

    gguf = load_model(str(gguf_source("smollm2-135m")), dtype="float32", device="cpu")
    assert gguf.info["config_hash"] == smollm2_loaded.info["config_hash"]
    assert gguf.info["tokenizer_hash"] == smollm2_loaded.info["tokenizer_hash"]
    assert gguf.info["chat_template_hash"] == smollm2_loaded.info["chat_template_hash"]
    tok = smollm2_loaded.tokenizer
    batch = tok(["The capital of Kazakhstan is", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        a = gguf.model(**batch).logits
        b = smollm2_loaded.model(**batch).logits
    assert torch.equal(a, b)


def test_load_imports_no_builder_until_a_spec_of_that_kind():
    import subprocess
    import sys
    code = ("import sys, mechdiff.models.load, mechdiff.models, mechdiff.pairs\n"
            "from mechdiff.models.kinds import offline_kind\n"
            "from mechdiff.pairs.spec import ModelSpec\n"
            "assert offline_kind(ModelSpec.parse('smollm2-135m')) == 'testbed'\n"
            "assert offline_kind(ModelSpec.parse('planted-cultural:base')) == 'planted'\n"
            "assert offline_kind(ModelSpec.parse('org/model')) is None\n"
            "print(sorted(m for m in sys.modules if m.endswith(('.planted', '.testbed'))))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_offline_specs_resolve_through_the_kind_registry(tiny_llama_dir, monkeypatch):
    from mechdiff.models import kinds
    d, model = tiny_llama_dir
    seen = []

    def fake(spec):
        seen.append(spec)
        return d, {"testbed": spec.id, "planted": "x"}

    monkeypatch.setitem(kinds._RESOLVERS, "planted", fake)
    lm = load_model("planted-cultural:tuned", device="cpu")
    assert [str(s) for s in seen] == ["planted-cultural:tuned"]
    assert lm.info["source"] == "testbed:planted-cultural:tuned" and lm.info["planted"] == "x"
    assert lm.info["resolved_path"] == str(d.resolve())
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(lm.model(ids).logits, model(ids).logits, atol=1e-6)
    monkeypatch.delitem(kinds._RESOLVERS, "planted")
    monkeypatch.setitem(kinds.PROVIDERS, "planted", "mechdiff.errors")   # a module that registers nothing
    with pytest.raises(ConfigError, match="no resolver is registered for planted"):
        load_model("planted-cultural:tuned", device="cpu")


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_extend_vocab_appends_mean_of_pieces_rows(family):
    from mechdiff.models.tiny import tiny_model
    from mechdiff.models.vocab import extend_vocab
    model, tok = tiny_model(family)
    n = len(tok)
    before = model.get_input_embeddings().weight.detach().clone()
    one_piece = tok.convert_ids_to_tokens(70)
    words = ["қымыз", "домбыра", one_piece]
    new_tok, ids, pieces = extend_vocab(model, tok, words)
    assert list(pieces) == ["қымыз", "домбыра"] and ids == [n, n + 1] and len(tok) == n
    assert new_tok("қымыз", add_special_tokens=False)["input_ids"] == [n]
    W = model.get_input_embeddings().weight
    assert W.shape[0] == n + 2 and torch.equal(W[:n], before[:n])
    for w, i in zip(pieces, ids):
        assert torch.allclose(W[i].double(), before[pieces[w]].double().mean(0), atol=1e-6)
    assert torch.equal(model.get_output_embeddings().weight[n:], W[n:])   # tied or written alike


# ------------------------------------------------------------------ trust_remote_code, adapter paths (issue 10)
def _spy_from_pretrained(monkeypatch):
    """Record the trust_remote_code every transformers from_pretrained call gets (and call through)."""
    import transformers

    seen: list[tuple[str, object]] = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        orig = cls.from_pretrained.__func__

        def spy(klass, *a, _orig=orig, _name=cls.__name__, **kw):
            seen.append((_name, kw.get("trust_remote_code", "missing")))
            return _orig(klass, *a, **kw)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return seen


@pytest.fixture
def tiny_lora_with_tokenizer(tiny_llama_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    d, base = tiny_llama_dir
    peft_model = get_peft_model(base, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    adir = tmp_path / "lora-tok"
    peft_model.save_pretrained(adir)
    _tiny_tokenizer().save_pretrained(adir)          # a tokenizer saved with the adapter is loaded too
    return d, adir


@pytest.mark.parametrize("asked", [None, False, True])
def test_trust_remote_code_reaches_model_tokenizer_and_adapter_tokenizer(tiny_lora_with_tokenizer, monkeypatch,
                                                                         asked):
    d, adir = tiny_lora_with_tokenizer
    seen = _spy_from_pretrained(monkeypatch)
    kw = {} if asked is None else {"trust_remote_code": asked}
    load_model(f"{d}+{adir}", dtype="float32", device="cpu", **kw)
    names = [n for n, _ in seen]
    assert names.count("AutoModelForCausalLM") == 1 and names.count("AutoTokenizer") == 2   # base tok + adapter tok
    assert all(v is bool(asked) for _, v in seen), seen


def test_pair_toml_key_and_cli_flag_set_trust_remote_code(tmp_path, monkeypatch):
    """`trust_remote_code = true` in a pair TOML, or --trust-remote-code, reaches load_model; default False."""
    from typer.testing import CliRunner

    import mechdiff.experiments.common as common
    from mechdiff.cli import app
    from mechdiff.pairs import load_pair

    seen = []

    def fake_load(spec, **kw):
        seen.append(kw.get("trust_remote_code", "missing"))
        raise ModelLoadError("stop after the first load")
    monkeypatch.setattr(common, "load_model", fake_load)
    toml = tmp_path / "p.toml"
    toml.write_text('base = "smollm2-135m"\ntuned = "smollm2-135m"\ntrust_remote_code = true\n', encoding="utf-8")
    assert load_pair(toml).trust_remote_code is True and load_pair(toml).to_dict()["trust_remote_code"] is True
    assert load_pair("smollm2-self").trust_remote_code is False
    assert "trust_remote_code" not in load_pair("smollm2-self").to_dict()    # old manifests still match
    bad = tmp_path / "bad.toml"
    bad.write_text('base = "smollm2-135m"\ntuned = "smollm2-135m"\ntrust_remote_code = "yes"\n', encoding="utf-8")
    with pytest.raises(ConfigError, match="trust_remote_code must be true or false"):
        load_pair(bad)
    for args, want in ((["--pair", "smollm2-self"], False), (["--pair", "smollm2-self", "--trust-remote-code"], True),
                       (["--pair", str(toml)], True)):
        seen.clear()
        res = CliRunner().invoke(app, ["rq1", *args, "--out", str(tmp_path / "run"), "--device", "cpu"])
        assert res.exit_code == 2 and "stop after the first load" in res.output, res.output
        assert seen == [want], (args, seen)
    seen.clear()
    res = CliRunner().invoke(app, ["run", "--pair", "smollm2-self", "--trust-remote-code", "--out",
                                   str(tmp_path / "run2"), "--device", "cpu"])
    assert res.exit_code == 2 and seen == [True], res.output


@pytest.mark.parametrize("adapter", ["/definitely/not/here/lora", "./not-here-lora", "~/not-here-lora-xyz"])
def test_missing_adapter_path_is_named_as_a_path_before_the_base_loads(tiny_llama_dir, monkeypatch, adapter):
    import mechdiff.models.load as load

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(load, "_from_pretrained", lambda *a, **k: pytest.fail("the base model was loaded"))
    d, _ = tiny_llama_dir
    with pytest.raises(ModelLoadError) as e:
        load_model(f"{d}+{adapter}", device="cpu")
    msg = str(e.value)
    assert "adapter path" in msg and "does not exist" in msg and ("not-here-lora" in msg or "not/here" in msg)
    assert "not in the local cache" not in msg and "unreachable" not in msg


def test_adapter_hub_id_that_is_no_directory_says_both(tiny_llama_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    d, _ = tiny_llama_dir
    with pytest.raises(ModelLoadError, match="no directory .*no-such-lora exists here.*not in the local cache"):
        load_model(f"{d}+mechdiff-test/no-such-lora", device="cpu")
