"""Shipped prompt sets and dataset loaders (local files only; no network)."""

import json
import sys
from collections import Counter
from pathlib import Path

import pytest

import mechdiff.data.datasets as dsmod
from mechdiff.data.datasets import (
    load_gsm8k,
    load_kk_socio_cultural_mc,
    load_math,
    load_prompt_set,
    load_records,
)
from mechdiff.errors import DataError

SETS_DIR = Path(dsmod.__file__).parent / "sets"


@pytest.mark.parametrize(
    "name,minimum,key",
    [("cultural", 600, "text"), ("neutral", 300, "text"), ("refusal_probe", 100, "text"), ("mc", 50, "question")],
)
def test_shipped_sets_load(name, minimum, key):
    rows = load_prompt_set(name)
    assert len(rows) >= minimum
    assert len({r["id"] for r in rows}) == len(rows)
    assert len({r[key] for r in rows}) == len(rows)  # no duplicate texts
    assert {r["lang"] for r in rows} <= {"kk", "ru", "en"}


def test_shipped_set_contents():
    cult = load_prompt_set("cultural")
    assert len(cult) == 930
    assert Counter(r["lang"] for r in cult) == {"kk": 310, "ru": 310, "en": 310}
    assert not any("relig" in r["category"] for r in cult)
    assert len({r["topic"] for r in cult}) == 62  # 62 topics x 5 templates x 3 languages
    assert len(load_prompt_set("neutral")) == 360
    probe = load_prompt_set("refusal_probe")
    assert Counter(r["category"] for r in probe) == {"harmful": 60, "benign": 60}
    mc = load_prompt_set("mc")
    assert len(mc) == 63
    assert all(0 <= r["answer"] < len(r["choices"]) for r in mc)
    assert len({r["answer"] for r in mc}) > 1  # answers are not always in the same slot


def test_generator_is_deterministic(tmp_path):
    sys.path.insert(0, str(SETS_DIR))
    try:
        import make_sets
    finally:
        sys.path.pop(0)
    sizes = make_sets.main(tmp_path)
    assert sizes == {"cultural": 930, "neutral": 360, "refusal_probe": 120, "mc": 63}
    for name in sizes:
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (SETS_DIR / f"{name}.jsonl").read_bytes()


def test_load_prompt_set_errors(tmp_path):
    with pytest.raises(DataError, match="cultural"):
        load_prompt_set("no_such_set")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "a", "text": "ok", "lang": "en"}\n{"id": "b", "lang": "en"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2.*text"):
        load_prompt_set(bad)
    bad.write_text('{"id": "a", "text": "ok"}\n\n{"id": "a", "text": "again"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":3: duplicate id"):
        load_prompt_set(bad)
    bad.write_text('{"id": "a", "text": "ok", "lang": "de"}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":1: 'lang'"):
        load_prompt_set(bad)
    bad.write_text('{"id": "m", "question": "q?", "choices": ["x", "y"], "answer": 2}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r":1: MC 'answer'"):
        load_prompt_set(bad)
    bad.write_text("not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":1: not valid JSON"):
        load_prompt_set(bad)


KK_ROWS = [
    {"id": 1, "question": "Наурыз қашан?", "A": "Наурызда", "B": "Қаңтарда", "C": "Мамырда", "D": "Шілдеде", "answer": "A", "category": "Culture"},
    {"id": 2, "question": "Ораза қай айда?", "A": "x", "B": "y", "C": "z", "D": "w", "answer": "B", "category": "Religion"},
    {"id": 3, "question": "Төр деген не?", "A": "есік", "B": "құрметті орын", "C": "шаңырақ", "D": "кереге", "answer": "B", "category": "Etiquette"},
    {"id": 4, "question": "Асар деген не?", "A": "ән", "B": "тағам", "C": "көмек", "D": "ойын", "answer": 2, "category": "Community"},
    {"id": 5, "question": "2+2?", "A": "3", "B": "4", "C": "5", "D": "6", "answer": "B", "category": "Mathematics"},
    {"id": 6, "question": "Беташар не?", "A": "той салты", "B": "ойын", "C": "ас", "D": "ән", "answer": "A", "category": "Traditions and customs"},
    {"id": 7, "question": "Діни мереке?", "A": "a", "B": "b", "C": "c", "D": "d", "answer": "A", "category": "Religious traditions"},
]


def test_kk_mc_category_filter_jsonl(tmp_path):
    f = tmp_path / "kkmc.jsonl"
    f.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in KK_ROWS) + "\n", encoding="utf-8")
    items = load_kk_socio_cultural_mc(str(f))
    assert [it["id"] for it in items] == ["kkmc-1", "kkmc-3", "kkmc-4", "kkmc-6"]
    assert [it["answer"] for it in items] == [0, 1, 2, 0]
    assert items[1]["choices"] == ["есік", "құрметті орын", "шаңырақ", "кереге"]
    assert all(it["lang"] == "kk" for it in items)
    only_etiquette = load_kk_socio_cultural_mc(str(f), categories=["etiquette"])
    assert [it["id"] for it in only_etiquette] == ["kkmc-3"]
    everything = load_kk_socio_cultural_mc(str(f), categories=None)
    assert len(everything) == 5  # all but the two religion rows
    with pytest.raises(DataError, match="categories present"):
        load_kk_socio_cultural_mc(str(f), categories=["sports"])


def test_kk_mc_csv_and_json(tmp_path):
    c = tmp_path / "kkmc.csv"
    c.write_text("id,question,options,label,topic\n"
                 "a,Домбыра?,\"[\"\"екі\"\", \"\"үш\"\"]\",0,Мәдениет\n"
                 "b,Дін?,\"[\"\"x\"\", \"\"y\"\"]\",1,Дін\n", encoding="utf-8")
    items = load_kk_socio_cultural_mc(str(c))
    assert [(i["id"], i["choices"], i["answer"]) for i in items] == [("kkmc-a", ["екі", "үш"], 0)]
    j = tmp_path / "kkmc.json"
    j.write_text(json.dumps({"data": [{"question": "q", "choices": ["u", "v"], "answer": "v", "category": "culture"}]}), encoding="utf-8")
    assert load_kk_socio_cultural_mc(str(j))[0]["answer"] == 1


def test_hub_without_network_or_datasets_fails_fast(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="local file"):
        load_kk_socio_cultural_mc("kz-transformers/kk-socio-cultural-bench-mc")
    with pytest.raises(DataError, match="local file"):
        load_records("openai/gsm8k")
    monkeypatch.setitem(sys.modules, "datasets", None)  # simulate the optional extra missing
    with pytest.raises(DataError, match=r"pip install mechdiff\[datasets\]"):
        load_gsm8k("openai/gsm8k")


def test_gsm8k_and_math_sampling(tmp_path):
    g = tmp_path / "gsm.jsonl"
    g.write_text("".join(json.dumps({"question": f"q{i}", "answer": f"steps\n#### {i * 1000:,}"}) + "\n" for i in range(50)), encoding="utf-8")
    a = load_gsm8k(str(g), n=10, seed=1)
    b = load_gsm8k(str(g), n=10, seed=1)
    c = load_gsm8k(str(g), n=10, seed=2)
    assert a == b and a != c and len(a) == 10
    assert len({x["id"] for x in a}) == 10
    k = int(a[0]["id"].split("-")[1])
    assert a[0]["final_answer"] == str(k * 1000)
    assert len(load_gsm8k(str(g), n=300)) == 50  # n larger than the file: everything
    m = tmp_path / "math.jsonl"
    m.write_text("".join(json.dumps({"problem": f"p{i}", "solution": f"so \\boxed{{\\frac{{{i}}}{{2}}}}", "level": "Level 1"}) + "\n" for i in range(20)), encoding="utf-8")
    ms = load_math(str(m), n=5, seed=0)
    assert len(ms) == 5
    i = int(ms[0]["problem"][1:])
    assert ms[0]["answer"] == f"\\frac{{{i}}}{{2}}"
    with pytest.raises(DataError, match="does not exist"):
        load_math(str(tmp_path / "missing.jsonl"))
