"""Shared stage steps that need no model: stratified selection, clusters, prompt digests, layer checks."""
from __future__ import annotations

import pytest

from mechdiff.errors import ConfigError
from mechdiff.experiments.steps import check_layers, group_ids, prompt_digest, stratified


def _rows():
    # 3 topics x 2 languages, the first topic has many more prompts (file order is clustered)
    rows = [{"id": f"a{i}", "text": f"a {i}", "topic": "a", "lang": "en"} for i in range(20)]
    rows += [{"id": f"b{i}", "text": f"b {i}", "topic": "b", "lang": l} for i, l in enumerate("en kk".split())]
    rows += [{"id": f"c{i}", "text": f"c {i}", "topic": "c", "lang": "ru"} for i in range(3)]
    return rows


def test_stratified_covers_every_stratum_before_repeating_one():
    got = stratified(_rows(), 4, seed=0)
    assert len(got) == 4 and len({r["id"] for r in got}) == 4
    assert {(r["topic"], r["lang"]) for r in got} == {("a", "en"), ("b", "en"), ("b", "kk"), ("c", "ru")}


def test_stratified_is_seeded_and_takes_all_when_asked_for_more():
    rows = _rows()
    assert stratified(rows, 10, seed=3) == stratified(rows, 10, seed=3)
    assert stratified(rows, 10, seed=3) != stratified(rows, 10, seed=4)
    assert sorted(r["id"] for r in stratified(rows, 99, seed=0)) == sorted(r["id"] for r in rows)


def test_group_ids_follow_topics():
    g = group_ids(_rows()).tolist()
    assert g[:20] == [0] * 20 and g[20:22] == [1, 1] and g[22:] == [2, 2, 2]


def test_prompt_digest_covers_the_text_not_only_the_id():
    rows = _rows()
    edited = [dict(r) for r in rows]
    edited[5]["text"] = "something else"
    assert prompt_digest(rows) == prompt_digest([dict(r) for r in rows])
    assert prompt_digest(rows) != prompt_digest(edited)


def test_check_layers_names_the_option_and_range():
    check_layers(30, layers=[0, 29], control_layer=None)
    with pytest.raises(ConfigError, match=r"--control-layer: layer 30 is out of range 0\.\.29"):
        check_layers(30, layers=[1], control_layer=30)
