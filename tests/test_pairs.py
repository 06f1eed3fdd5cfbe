from pathlib import Path

import pytest

from mechdiff.errors import ConfigError
from mechdiff.pairs import ModelSpec, Pair, list_pairs, load_pair, pair_from_specs

BUILTINS = {"cultural", "cognitive", "planted-cultural", "planted-cognitive", "smollm2-vs-gemma3", "smollm2-self",
            "smollm2-math-lora", "smollm2-culture-lora", "smollm2-culture-l20-r1", "smollm2-culture-l20-r2",
            "smollm2-culture-l20-r4", "smollm2-culture-l20-r8", "smollm2-math-attn-4"}


def test_parse_hub_with_and_without_revision():
    s = ModelSpec.parse("meta-llama/Llama-3.1-8B-Instruct@abc123")
    assert (s.kind, s.id, s.revision, s.adapter) == ("hub", "meta-llama/Llama-3.1-8B-Instruct", "abc123", None)
    assert str(s) == "meta-llama/Llama-3.1-8B-Instruct@abc123"
    s = ModelSpec.parse("gpt2")
    assert (s.kind, s.id, s.revision) == ("hub", "gpt2", None)


def test_parse_local_dir_and_gguf(tmp_path):
    s = ModelSpec.parse(str(tmp_path))
    assert s.kind == "local" and s.path == str(tmp_path)
    assert ModelSpec.parse("./some/dir").kind == "local"
    g = ModelSpec.parse("/models/x/SmolLM2.Q4_1.gguf")
    assert (g.kind, g.path, g.gguf_file) == ("gguf", "/models/x", "SmolLM2.Q4_1.gguf")
    assert g.gguf_path == "/models/x/SmolLM2.Q4_1.gguf"


def test_parse_testbed_and_planted():
    assert ModelSpec.parse("smollm2-135m").kind == "testbed"
    assert ModelSpec.parse("gemma3-270m").kind == "testbed"
    s = ModelSpec.parse("planted-cultural:tuned")
    assert s.kind == "testbed" and s.planted == ("planted-cultural", "tuned")
    assert ModelSpec.parse("planted-cognitive:base").planted == ("planted-cognitive", "base")
    with pytest.raises(ConfigError, match="planted-cultural"):
        ModelSpec.parse("planted-foo:base")


def test_parse_adapter_forms(tmp_path):
    s = ModelSpec.parse("org/base@v1+/adapters/lora")
    assert (s.kind, s.id, s.revision, s.adapter) == ("hub", "org/base", "v1", "/adapters/lora")
    s = ModelSpec.parse(f"{tmp_path}+org/my-lora")
    assert s.kind == "local" and s.adapter == "org/my-lora"
    t = ModelSpec.from_toml({"base": "org/base", "adapter": "org/lora"})
    assert (t.kind, t.id, t.adapter) == ("hub", "org/base", "org/lora")


def test_from_toml_tables():
    assert ModelSpec.from_toml({"hub": "a/b", "revision": "main"}) == ModelSpec(kind="hub", id="a/b", revision="main")
    assert ModelSpec.from_toml({"path": "/x"}) == ModelSpec(kind="local", path="/x")
    assert ModelSpec.from_toml({"gguf": "/x/m.gguf"}) == ModelSpec(kind="gguf", path="/x", gguf_file="m.gguf")
    assert ModelSpec.from_toml({"hub": "a/b", "gguf": "m.gguf"}) == ModelSpec(kind="gguf", id="a/b", gguf_file="m.gguf")
    assert ModelSpec.from_toml({"testbed": "smollm2-135m"}).kind == "testbed"
    with pytest.raises(ConfigError, match="unknown keys"):
        ModelSpec.from_toml({"hub": "a/b", "revison": "x"})
    with pytest.raises(ConfigError, match="only one"):
        ModelSpec.from_toml({"hub": "a/b", "path": "/x"})


def test_bad_specs():
    for bad in ["", "a b c", "org/name@", "+adapter"]:
        with pytest.raises(ConfigError):
            ModelSpec.parse(bad)


def test_builtin_pairs_load_and_validate():
    assert set(list_pairs()) == BUILTINS
    for name in list_pairs():
        p = load_pair(name)
        assert p.name == name and isinstance(p, Pair)
        assert p.tokenizer_policy in ("shared_vocab_required", "shared_vocab_recommended")
        assert p.datasets
        p.to_dict()


def test_seed_pairs_match_the_brief():
    c = load_pair("cultural")
    assert c.base == ModelSpec.parse("meta-llama/Llama-3.1-8B-Instruct")
    assert c.tuned == ModelSpec.parse("inceptionai/Llama-3.1-Sherkala-8B-Chat")
    assert c.tokenizer_policy == "shared_vocab_required" and c.domain == "cultural"
    assert c.datasets["kk-socio-cultural-bench-mc"].hub == "kz-transformers/kk-socio-cultural-bench-mc"
    assert c.datasets["freeform"].n == 40
    g = load_pair("cognitive")
    assert g.tuned.id == "nvidia/OpenMath2-Llama3.1-8B" and g.tokenizer_policy == "shared_vocab_recommended"
    assert (g.datasets["gsm8k"].hub, g.datasets["gsm8k"].config, g.datasets["gsm8k"].n) == ("openai/gsm8k", "main", 300)
    assert (g.datasets["MATH"].hub, g.datasets["MATH"].n) == ("hendrycks/competition_math", 100)
    assert load_pair("smollm2-self").base == load_pair("smollm2-self").tuned
    assert load_pair("planted-cultural").tuned.planted == ("planted-cultural", "tuned")


def test_unknown_pair_lists_known_names():
    with pytest.raises(ConfigError) as e:
        load_pair("no-such-pair")
    for name in BUILTINS:
        assert name in str(e.value)


def test_bad_tokenizer_policy(tmp_path: Path):
    f = tmp_path / "p.toml"
    f.write_text('name = "p"\nbase = "a/b"\ntuned = "a/c"\ntokenizer_policy = "whatever"\n')
    with pytest.raises(ConfigError, match="shared_vocab_required"):
        load_pair(str(f))
    with pytest.raises(ConfigError, match="tokenizer_policy"):
        pair_from_specs("a/b", "a/c", tokenizer_policy="nope")


def test_pair_file_roundtrip_and_errors(tmp_path: Path):
    f = tmp_path / "mine.toml"
    f.write_text('base = "smollm2-135m"\ntuned = {gguf = "/x/y.gguf"}\n[datasets]\nq = { path = "/d/q.jsonl", n = 5 }\n')
    p = load_pair(f)
    assert p.name == "mine" and p.tuned.kind == "gguf" and p.datasets["q"].path == "/d/q.jsonl"
    f.write_text('base = "a/b"\n')
    with pytest.raises(ConfigError, match="tuned"):
        load_pair(f)
    f.write_text('base = "a/b"\ntuned = "a/c"\ncolour = 1\n')
    with pytest.raises(ConfigError, match="unknown keys"):
        load_pair(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_pair(tmp_path / "missing.toml")


def test_pair_from_specs():
    p = pair_from_specs("smollm2-135m", "planted-cultural:tuned")
    assert p.base.kind == "testbed" and p.tuned.planted == ("planted-cultural", "tuned")
    assert p.dtype == "auto"
