"""Issue 22 (hardening round 2), end to end: cached results keyed on the models' content, no
directory removed that the command did not create, pair names kept inside the sweep directory."""
from __future__ import annotations

import json

import pytest

#: the cheapest RQ1 that still caches every step: one patched layer, one readout, no behaviour table
RQ1_SMALL = dict(behaviour=False, n_perm=2, layers=[1], readouts=["decision"], device="cpu", batch_size=6,
                 n_prompts=6)


def _prompts(root, n: int = 9):
    f = root / "prompts.jsonl"
    f.write_text("\n".join(json.dumps({"id": f"q{i}", "text": "word " * (1 + i % 4) + f"item {i}",
                                        "topic": f"t{i % 3}"}) for i in range(n)), encoding="utf-8")
    return f


def _results(run) -> tuple:
    return run.read_json("cka.json"), run.read_json("patch.json")


def _zero_patch_kl(patch: dict) -> bool:
    """Every direction's patch KL exactly 0 at every layer: the two models are one."""
    return all(r["mean"] == 0.0 for d in patch["directions"].values() for r in d["masked"])


@pytest.fixture(scope="module")
def fresh_self_diff(tmp_path_factory):
    """A fresh RQ1 of the tiny base model (tiny_model seed 0) against itself, shared by the two
    in-place tests below: after their tuned side is changed in place to equal that base, a rerun
    into the old directory must give exactly this (and patch KL 0, the known answer)."""
    from mechdiff.experiments.stage import run_stage
    from mechdiff.models.tiny import tiny_model
    root = tmp_path_factory.mktemp("self-diff")
    m, tok = tiny_model("llama", seed=0, n_layers=4)
    m.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    f = root / "self.toml"
    f.write_text(f'name = "self"\nbase = "{root / "base"}"\ntuned = "{root / "base"}"\ndtype = "float32"\n'
                 f'[datasets]\nset = "{_prompts(root)}"\n', encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MECHDIFF_CACHE", str(root / "cache"))
        fresh = _results(run_stage("rq1", str(f), out=root / "run", **RQ1_SMALL))
    assert _zero_patch_kl(fresh[1])
    return fresh


def test_weights_replaced_in_place_are_recomputed_like_a_fresh_run(tmp_path, tiny_pair, monkeypatch,
                                                                  fresh_self_diff):
    """Item 1: replacing the tuned model's weights in its directory (here by the base's, same size)
    and rerunning into the same --out recomputes every step, equal to a fresh run of the models as
    they now are (base against itself: patch KL 0), where the steps used to be skipped."""
    from mechdiff.experiments.stage import run_stage
    from mechdiff.models.tiny import tiny_model
    monkeypatch.setenv("MECHDIFF_CACHE", str(tmp_path / "cache"))
    pair, out = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path))), tmp_path / "run"
    before = _results(run_stage("rq1", pair, out=out, **RQ1_SMALL))
    assert not _zero_patch_kl(before[1])
    m, _ = tiny_model("llama", seed=0, n_layers=4)
    m.save_pretrained(tmp_path / "tiny-tuned")                 # same path, same size, new weights
    after = _results(run_stage("rq1", pair, out=out, **RQ1_SMALL))
    assert after != before and after == fresh_self_diff


def test_an_adapter_edited_in_place_is_recomputed_like_a_fresh_run(tmp_path, monkeypatch, fresh_self_diff):
    """Item 1 for a PEFT adapter: zeroing its B matrices in place makes the rerun recompute: the
    tuned model equals the base, so the rerun equals a fresh run of the base against itself."""
    import torch
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file, save_file

    from mechdiff.experiments.stage import run_stage
    from mechdiff.models.tiny import tiny_model
    monkeypatch.setenv("MECHDIFF_CACHE", str(tmp_path / "cache"))
    base, tok = tiny_model("llama", seed=0, n_layers=4)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    torch.manual_seed(0)
    lora = get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora.save_pretrained(tmp_path / "lora")
    f = tmp_path / "pair.toml"
    f.write_text(f'name = "lora"\nbase = "{tmp_path / "base"}"\ntuned = "{tmp_path / "base"}+{tmp_path / "lora"}"\n'
                 f'dtype = "float32"\n[datasets]\nset = "{_prompts(tmp_path)}"\n', encoding="utf-8")
    out = tmp_path / "run"
    before = _results(run_stage("rq1", str(f), out=out, **RQ1_SMALL))
    assert not _zero_patch_kl(before[1])
    weights = tmp_path / "lora" / "adapter_model.safetensors"
    state = load_file(weights)
    save_file({k: torch.zeros_like(v) if "lora_B" in k else v for k, v in state.items()}, weights)
    after = _results(run_stage("rq1", str(f), out=out, **RQ1_SMALL))
    assert after != before and after == fresh_self_diff


def test_finetune_out_never_removes_what_it_did_not_write(tmp_path):
    """Item 2: a non-empty --out that is not a fine-tune output is refused and left as it was; over
    an earlier fine-tune's output only that fine-tune's files are replaced (a user's file stays)."""
    from mechdiff.errors import ConfigError
    from mechdiff.finetune import finetune
    from mechdiff.finetune.card import verify_card
    mine = tmp_path / "results"
    mine.mkdir()
    (mine / "notes.txt").write_text("my own work", encoding="utf-8")
    (mine / "sub").mkdir()
    with pytest.raises(ConfigError, match="not empty and not a fine-tune output"):
        finetune("math", mine, smoke=True, evaluate=False, max_steps=1, log=lambda s: None)
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt", "sub"]
    assert (mine / "notes.txt").read_text(encoding="utf-8") == "my own work"
    out = tmp_path / "adapter"
    finetune("math", out, smoke=True, evaluate=False, max_steps=1, log=lambda s: None)
    (out / "keep.txt").write_text("kept", encoding="utf-8")
    card = finetune("math", out, smoke=True, evaluate=False, max_steps=2, log=lambda s: None)
    assert card["training"]["steps"] == 2 and (out / "keep.txt").read_text(encoding="utf-8") == "kept"
    assert verify_card(out) == []


@pytest.mark.parametrize("steps", [0, -1])
def test_finetune_max_steps_below_one_is_refused_before_any_work(tmp_path, steps):
    """Item 4: --max-steps 0 used to run the whole recipe, -1 to write an untrained adapter."""
    from mechdiff.errors import ConfigError
    from mechdiff.finetune import finetune
    with pytest.raises(ConfigError, match="--max-steps must be >= 1"):
        finetune("math", tmp_path / "out", smoke=True, evaluate=False, max_steps=steps, log=lambda s: None)
    assert not (tmp_path / "out").exists()


class _FakeRay:
    """Just enough of Ray for `sweep` to run its tasks inline."""

    def is_initialized(self):
        return True

    def cluster_resources(self):
        return {}

    def remote(self, **kw):
        return lambda fn: type("T", (), {"remote": staticmethod(fn)})

    def get(self, ref):
        return ref


@pytest.mark.parametrize("name", ["../../../escaped", "/tmp/abs-i22-escape", "a/../../b", "_..", "c:\\\\x y"])
def test_sweep_pair_names_stay_inside_out(tmp_path, monkeypatch, name):
    """Item 3: a pair TOML's `name` becomes one safe path component under --out (a traversal or
    absolute name used to put that pair's run directory outside the sweep directory)."""
    import sys
    from pathlib import Path

    import mechdiff.experiments.sweep as sw
    from mechdiff.errors import ConfigError
    written = []

    def run_one(pair, out, *a):
        written.append(Path(out))
        Path(out).mkdir(parents=True)
        return out
    monkeypatch.setitem(sys.modules, "ray", _FakeRay())
    monkeypatch.setattr(sw, "_run_one", run_one)
    monkeypatch.setattr(sw, "compare_runs", lambda *a, **k: None)
    tomls = []
    for i, n in enumerate([name, "plain"]):
        f = tmp_path / f"p{i}.toml"
        f.write_text(f'name = {json.dumps(n)}\nbase = "smollm2-135m"\ntuned = "smollm2-135m"\n', encoding="utf-8")
        tomls.append(str(f))
    root = tmp_path / "deep" / "sweep"
    if name == "_..":
        with pytest.raises(ConfigError, match="no letters or digits"):
            sw.sweep(tomls, "rq1", root)
        return
    sw.sweep(tomls, "rq1", root)
    assert len(written) == 2
    for p in written:
        assert p.parent == root.resolve(), p
    assert sorted(x.name for x in (tmp_path / "deep").iterdir()) == ["sweep"]
    assert not Path("/tmp/abs-i22-escape").exists()


def test_sweep_missing_config_fails_before_ray(tmp_path, monkeypatch):
    """Item 9: `sweep --config missing.toml` is refused before Ray is imported or started."""
    import sys

    import mechdiff.experiments.sweep as sw
    from mechdiff.errors import ConfigError
    monkeypatch.setitem(sys.modules, "ray", None)      # importing ray would fail
    with pytest.raises(ConfigError, match="run config .*missing.toml does not exist"):
        sw.sweep("planted-cultural,planted-cognitive", None, tmp_path / "s", config=tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="--max-rows must be >= 1"):
        sw.sweep("planted-cultural,planted-cognitive", None, tmp_path / "s", max_rows=0)
    assert not (tmp_path / "s").exists()


def test_entry_layer_is_no_stronger_than_the_patched_layers():
    """Item 5: with --layers 20,24 the entry is "layer 20 or earlier" (nothing below was patched);
    exact only when the layer below was patched too."""
    from mechdiff.experiments.summaries import entry_phrase
    assert entry_phrase(20, [20, 24]) == "layer 20 or earlier (layers below 20 were not patched)"
    assert entry_phrase(20, [18, 20, 22]) == "layer 20 or earlier (after layer 18; layer 19 was not patched)"
    assert entry_phrase(20, [10, 20]) == "layer 20 or earlier (after layer 10; layers 11-19 were not patched)"
    assert entry_phrase(20, [19, 20]) == "layer 20" and entry_phrase(0, [0, 4]) == "layer 0"


def test_mapped_patch_across_widths_says_raw_kl_na_not_zero():
    """Item 5: where the widths differ there is no raw patch: the reasons and the report sentence say
    "raw KL n/a: widths differ", never that the raw patch changes nothing."""
    import test_rq2

    from mechdiff.experiments.maps_summary import stop_conditions, sweep_table
    from mechdiff.experiments.summaries import rq2_text
    v = test_rq2._variants()
    v["variants"] = [r for r in v["variants"] if r["kind"] != "raw"]
    t = sweep_table(v)
    s = stop_conditions(t, test_rq2.SIDE_OK)
    assert "widths differ" in s["reasons"]["large_drop"] and "changes nothing" not in s["reasons"]["large_drop"]
    text = " ".join(rq2_text(None, {**t, "stop_conditions": s}, v))
    assert "raw KL n/a (widths differ)" in text and "changes nothing" not in text


def test_pair_layers_out_of_range_are_refused_not_dropped(tmp_path, tiny_pair):
    """Item 4: a pair TOML with `layers = [99]` used to be dropped silently by `heads` (which then ran
    on its default layers); now one error names the pair's key and the range, and nothing is written."""
    from mechdiff.errors import ConfigError
    from mechdiff.experiments.stage import run_stage
    f = tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path))
    f.write_text(f.read_text(encoding="utf-8").replace('dtype = "float32"\n', 'dtype = "float32"\nlayers = [99]\n'),
                 encoding="utf-8")
    with pytest.raises(ConfigError, match=r"layers = \[99\]: layer\(s\) \[99\] out of range 0..3"):
        run_stage("heads", str(f), out=tmp_path / "run", device="cpu", n_prompts=4)
    assert not (tmp_path / "run").exists()


def test_run_config_tables_of_stages_not_run_are_checked_before_models_load(tmp_path, monkeypatch):
    """Item 9: `ks = [0]` under [steer] fails with --stages rq1 too, before any model loads."""
    from mechdiff.errors import ConfigError
    from mechdiff.experiments import common
    from mechdiff.experiments.study import run_study
    monkeypatch.setattr(common, "open_models", lambda *a, **k: pytest.fail("a model loaded"))
    for table, match in (("[steer]\nks = [0]\n", r"\[steer\] --k"),
                         ("[steer]\nsteer_alpha = []\n", r"\[steer\] --steer-alpha"),
                         ("[steer]\nalphas = [1.0]\n", r"\[steer\] alphas was renamed: use steer_alpha"),
                         ("[heads]\nn_prompts = 0\n", r"\[heads\] --n-prompts"),
                         ("[mapped-patch]\nside_n = 0\n", r"\[mapped-patch\] --side-n must be >= 1"),
                         ("[steer]\nks = \"1,x\"\n", r"\[steer\] ks: expected a comma list of integers")):
        cfg = tmp_path / "cfg.toml"
        cfg.write_text(table, encoding="utf-8")
        with pytest.raises(ConfigError, match=match):
            run_study("planted-cultural", cfg, "rq1", tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_duplicate_prompt_texts_are_dropped_with_a_counted_warning(tmp_path, capsys):
    """Item 8: eight copies of one text (distinct ids) used to crash RQ1's summary late; now the
    repeats are dropped at load time with one counted warning."""
    from mechdiff.data.prompts import load_jsonl
    f = tmp_path / "p.jsonl"
    rows = [{"id": f"c{i}", "text": "same text"} for i in range(8)] + [{"id": "x", "text": "other"}]
    f.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    got = load_jsonl(f)
    assert [r["id"] for r in got] == ["c0", "x"]
    err = capsys.readouterr().err
    assert "warning:" in err and "7 prompt(s) repeat an earlier prompt's text" in err and "line 2 repeats line 1" in err


def test_a_stage_that_crashes_with_a_bug_leaves_no_options_behind(tmp_path, monkeypatch, tiny_pair):
    """Item 8: a stage failing with any exception (here a TypeError) forgets its recorded options, so
    the corrected rerun with other options into the same --out is not refused."""
    import dataclasses

    from mechdiff.experiments import stage as st
    pair, out = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path))), tmp_path / "run"
    real = st.get_stage("rq1")

    def crash(study, opts):
        raise TypeError("a bug")
    monkeypatch.setitem(st.STAGES, "rq1", dataclasses.replace(real, run=crash))
    with pytest.raises(TypeError):
        st.run_stage("rq1", pair, out=out, **{**RQ1_SMALL, "n_prompts": 5})
    assert "rq1" not in json.loads((out / "manifest.json").read_text(encoding="utf-8")).get("options", {})


def test_artifacts_get_the_umask_mode_not_0600(tmp_path):
    """Item 10: atomic writes used mkstemp's 0600 whatever the umask; colleagues could not read a run."""
    import os
    import stat

    from mechdiff.artifacts import RunDir
    old = os.umask(0o022)
    try:
        run = RunDir(tmp_path / "run")
        p = run.write_json("x.json", {"a": 1})
        assert stat.S_IMODE(p.stat().st_mode) == 0o644
        os.umask(0o027)
        assert stat.S_IMODE(run.write_json("y.json", {}).stat().st_mode) == 0o640
    finally:
        os.umask(old)


def test_custom_code_model_dir_is_refused_naming_the_flag(tmp_path):
    """Item 10: a model directory with custom code (auto_map) is refused with a line naming
    --trust-remote-code, not transformers' own message about trust_remote_code=True."""
    from mechdiff.errors import ModelLoadError
    from mechdiff.models.load import load_model
    from mechdiff.models.tiny import tiny_model
    m, tok = tiny_model("llama", n_layers=2)
    d = tmp_path / "custom"
    m.save_pretrained(d)
    tok.save_pretrained(d)
    cfg = json.loads((d / "config.json").read_text(encoding="utf-8"))
    cfg["model_type"] = "xcustom"
    cfg["auto_map"] = {"AutoConfig": "modeling_x.XConfig", "AutoModelForCausalLM": "modeling_x.XForCausalLM"}
    (d / "config.json").write_text(json.dumps(cfg), encoding="utf-8")
    (d / "modeling_x.py").write_text("raise SystemExit('custom code ran')\n", encoding="utf-8")
    with pytest.raises(ModelLoadError, match="pass --trust-remote-code"):
        load_model(str(d), device="cpu")


def test_ks_wider_than_the_model_and_bad_head_paths_fail_before_any_write(tmp_path, tiny_pair):
    """Items 9/10: `steer --k` above the model width (it used to run minutes and fail only in the
    summary) and `heads --path L.H:...` with a head the models lack (it failed after the ablations
    without naming --path) are refused once the models load, before anything is written."""
    from mechdiff.errors import ConfigError
    from mechdiff.experiments.stage import run_stage
    pair = str(tiny_pair(tmp_path, "tiny", 1, _prompts(tmp_path)))
    with pytest.raises(ConfigError, match=r"--k: k = 100 exceeds the models' width d = 64"):
        run_stage("steer", pair, out=tmp_path / "run", device="cpu", ks=[100], n_fit=200)
    with pytest.raises(ConfigError, match=r"--path '1.99:logits': head 99 is out of range 0..3"):
        run_stage("heads", pair, out=tmp_path / "run", device="cpu", n_prompts=4, path=["1.99:logits"])
    assert not (tmp_path / "run").exists()


def test_ctrl_c_during_start_up_is_one_line(monkeypatch, capsys):
    """Item 7: Ctrl-C while the CLI imports the stages (torch) ends with one line and exit 130."""
    import mechdiff.cli as cli

    def interrupted():
        raise KeyboardInterrupt
    monkeypatch.setattr(cli, "_register_stages", interrupted)
    with pytest.raises(SystemExit) as e:
        cli._start()
    assert e.value.code == 130 and "interrupted during start-up" in capsys.readouterr().err


def test_a_relative_dataset_path_is_taken_from_the_pair_tomls_folder(tmp_path, monkeypatch):
    """Item 10: a dataset path in a pair TOML is looked up beside the TOML (it was taken from the
    working directory), and a missing one names every place looked at."""
    from mechdiff.errors import DataError
    from mechdiff.experiments.common import target_prompts
    from mechdiff.pairs import load_pair
    d = tmp_path / "pairs"
    d.mkdir()
    _prompts(d, 5)
    f = d / "p.toml"
    f.write_text('base = "smollm2-135m"\ntuned = "smollm2-135m"\n[datasets]\nset = "prompts.jsonl"\n', encoding="utf-8")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert len(target_prompts(load_pair(str(f)))) == 5
    assert load_pair(str(f)).to_dict()["datasets"] == {"set": {"path": "prompts.jsonl"}}   # manifests unchanged
    (d / "prompts.jsonl").unlink()
    with pytest.raises(DataError, match=rf"not found; looked in {d / 'prompts.jsonl'} and {elsewhere / 'prompts.jsonl'}"):
        target_prompts(load_pair(str(f)))


def test_a_write_that_fails_mid_run_is_one_line_not_a_traceback(monkeypatch, tmp_path):
    """Item 7: an OSError mid-run (a read-only or full --out discovered after the models load) is one
    `error:` line naming the file, exit 2."""
    from typer.testing import CliRunner

    import mechdiff.experiments.stage as stage
    from mechdiff.cli import app

    def denied(*a, **k):
        raise PermissionError(13, "Permission denied", str(tmp_path / "run" / "manifest.json"))
    monkeypatch.setattr(stage, "run_stage", denied)
    res = CliRunner().invoke(app, ["rq1", "--pair", "planted-cultural", "--out", str(tmp_path / "run")])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "error: Permission denied" in res.stderr and "manifest.json" in res.stderr


def test_done_message_lists_only_files_that_were_written(tmp_path):
    """Item 9: the done line used to list files a stage never wrote (e.g. no handle could be built)."""
    from mechdiff.cli import _done_line
    (tmp_path / "rq3.json").write_text("{}", encoding="utf-8")
    msg = "RQ3 done: {path}  (rq3.json, rq3_summary.txt, handles/, figures/steer_vs_k.png)"
    assert _done_line(msg, tmp_path) == f"RQ3 done: {tmp_path}  (rq3.json)"
    (tmp_path / "rq3.json").unlink()
    assert _done_line(msg, tmp_path) == f"RQ3 done: {tmp_path}"


def test_content_hash_sees_an_in_place_edit_and_reuses_unchanged_digests(tmp_path, monkeypatch):
    """Item 1, the fingerprint itself: same bytes -> same hash (also for a copy elsewhere); one changed
    byte in place -> another hash; an unchanged file is not read again (its digest is cached)."""
    import shutil

    import mechdiff.models.content as content
    monkeypatch.setenv("MECHDIFF_CACHE", str(tmp_path / "cache"))
    d = tmp_path / "model"
    d.mkdir()
    (d / "config.json").write_text("{}", encoding="utf-8")
    (d / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    (d / "notes.md").write_text("not read by a load", encoding="utf-8")
    h = content.content_hash([d])
    shutil.copytree(d, tmp_path / "copy")
    assert content.content_hash([tmp_path / "copy"]) == h
    (d / "notes.md").write_text("changed", encoding="utf-8")
    assert content.content_hash([d]) == h
    reads = []
    monkeypatch.setattr(content, "_file_digest", lambda p, st: reads.append(p) or "x")
    content.content_hash([d])
    assert reads == []                                              # size/mtime/inode unchanged: cached
    monkeypatch.undo()
    monkeypatch.setenv("MECHDIFF_CACHE", str(tmp_path / "cache"))
    data = bytearray((d / "model.safetensors").read_bytes())
    data[5000] ^= 1
    with open(d / "model.safetensors", "r+b") as fh:                  # in place: same inode, same size
        fh.write(bytes(data))
    assert content.content_hash([d]) != h
