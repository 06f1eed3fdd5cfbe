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


# ---------------------------------------------------------------- the one split (issue 11)
def _clustered():
    """6 topics x 3 languages x 2 prompts; each (topic, index) is a translation group of 3 prompts; topic
    t5's translation group 0 is also linked to topic t4 through an explicit ``translation_group``."""
    rows = [{"id": f"{t}-{lang}-{i}", "text": f"{t} {lang} {i}", "topic": t, "lang": lang}
            for t in [f"t{k}" for k in range(6)] for lang in ("en", "kk", "ru") for i in range(2)]
    for r in rows:
        if r["topic"] in ("t4", "t5") and r["id"].endswith("-0"):
            r["translation_group"] = "shared-4-5"
    return rows


def test_cluster_split_shares_no_topic_or_translation_group_and_holds_out_rq1_prompts():
    from mechdiff.experiments.steps import cluster_split, clusters
    rows = _clustered()
    key = dict(zip([r["id"] for r in rows], clusters(rows)))
    assert key["t4-en-0"] == key["t5-kk-0"] == key["t4-ru-1"]           # linked through the translation group
    held = {"t0-en-0", "t1-kk-1", "t2-ru-0", "t3-en-1"}                   # e.g. RQ1's layer-selection prompts
    for seed in range(5):
        train, dev, test = cluster_split(rows, [6, 4, 4], seed, hold_out=held)
        assert [len(p) for p in (train, dev, test)] == [6, 4, 4]
        parts = [{key[r["id"]] for r in p} for p in (train, dev, test)]
        assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2]), seed
        topics = [{r["topic"] for r in p} for p in (train, dev, test)]
        assert not (topics[0] & topics[1] or topics[0] & topics[2] or topics[1] & topics[2]), seed
        assert not held & {r["id"] for r in dev + test}
    # the result depends on the set of prompts and the seed, not the file order
    assert cluster_split(rows, [6, 4, 4], 3) == cluster_split(list(reversed(rows)), [6, 4, 4], 3)


def test_cluster_split_drops_repeated_texts_and_names_what_is_missing():
    from mechdiff.errors import DataError
    from mechdiff.experiments.steps import cluster_split
    rows = _clustered()
    dup = [*rows, {"id": "again", "text": "T0  EN 0", "topic": "other"}]
    assert "again" not in {r["id"] for p in cluster_split(dup, [30, 6], 0) for r in p}
    with pytest.raises(DataError, match="not enough prompts.*36 distinct prompts in 5 topic/translation clusters"):
        cluster_split(rows, [30, 7], 0)
    with pytest.raises(DataError, match="duplicate prompt ids"):
        cluster_split(rows + [dict(rows[0])], [2, 2], 0)


def test_fair_split_keeps_the_prompts_rq1_chose_layers_on_out_of_evaluation(tmp_path):
    """fair_split reads RQ1's prompt ids from fairness.json in the run directory."""
    from types import SimpleNamespace

    from mechdiff.artifacts import RunDir
    from mechdiff.experiments.steps import fair_split
    rows = _clustered()
    run = RunDir(tmp_path / "run")
    picked = [r["id"] for r in rows if r["id"].endswith("-1")]               # half of every topic
    run.write_json("fairness.json", {"prompt_ids": picked})
    study = SimpleNamespace(run=run, fair_prompts=lambda ratio: (rows, {}))
    train, dev, test = fair_split(study, [6, 3, 3], 1.0, seed=0)
    assert not set(picked) & {r["id"] for r in dev + test}
    assert len(dev) == len(test) == 3
    without = fair_split(SimpleNamespace(run=RunDir(tmp_path / "other"), fair_prompts=lambda r: (rows, {})),
                         [6, 12, 12], 1.0, seed=0)
    assert set(picked) & {r["id"] for r in without[1] + without[2]}        # without RQ1 they may be evaluated
