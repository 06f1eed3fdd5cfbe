import base64
import math

import numpy as np
import pytest

from mechdiff import plots
from mechdiff.artifacts import RunDir
from mechdiff.manifest import build_manifest
import mechdiff.experiments  # noqa: F401  (registers the stages and their report hooks)
from mechdiff.report import write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(p):
    data = p.read_bytes()
    return len(data) > 1000 and data.startswith(PNG_MAGIC)


@pytest.fixture
def figdir(tmp_path):
    d = tmp_path / "figures"
    d.mkdir()
    return d


def test_plot_cka_curve(figdir):
    L = list(range(8))
    deb = np.linspace(0.99, 0.6, 8)
    p = plots.plot_cka_curve(L, deb, deb - 0.05, deb + 0.05, deb + 0.02, 0.1, 0.02,
                             figdir / "cka.png", "CKA")
    assert _is_png(p)
    p2 = plots.plot_cka_curve(L, list(deb[:-1]) + [math.nan], None, None, None, None, None,
                              figdir / "cka2.png")
    assert _is_png(p2)


def test_plot_cka_matrix(figdir):
    m = np.random.default_rng(0).uniform(size=(6, 9))
    m[0, 0] = np.nan
    assert _is_png(plots.plot_cka_matrix(m, figdir / "mat.png", "gemma layer", "smollm layer"))


def test_plot_patch_kl(figdir):
    L = [0, 1, 2, 3]
    kl = {"base->tuned": ([0.1, 0.2, 0.8, 0.3], [0.01, 0.02, 0.1, 0.05]),
          "tuned->base": ([0.1, 0.3, 0.7, None], None)}
    assert _is_png(plots.plot_patch_kl(L, kl, figdir / "kl.png", planted_layers=[2]))


def test_plot_map_quality(figdir):
    rows = [{"label": "L10 resid", "r2_vw": 0.8, "cka": 0.9},
            {"label": "L24 attn", "r2_vw": -0.1, "cka": None}]
    assert _is_png(plots.plot_map_quality(rows, figdir / "maps.png"))


def test_plot_drop_heatmap(figdir):
    rows = [{"layer": L, "site": s, "alpha": a, "drop_pct": 10 * a * L - 5}
            for L in (10, 24) for s in ("attn_out", "mlp_out") for a in (0.3, 0.5, 1.0)]
    rows.append({"layer": 26, "site": "resid_post", "alpha": 0.3, "drop_pct": None})
    assert _is_png(plots.plot_drop_heatmap(rows, figdir / "drop.png"))


def test_report_renders_headlines_tables_and_images(tmp_path):
    run = RunDir(tmp_path)
    run.write_manifest(build_manifest(
        pair={"name": "planted-culture"},
        models={"base": {"spec": "smollm2", "revision": "abc123", "tokenizer_hash": "tokhashA",
                         "dtype": "float32"},
                "tuned": {"spec": "planted", "revision": "def456", "tokenizer_hash": "tokhashB"}},
        seeds={"split": 0}, options={"layers": [1]}, command=["mechdiff", "rq1"]))
    run.write_json("rq1.json", {"title": "RQ1: where do they diverge",
                                "headline": {"min_cka_layer": 24, "min_cka": 0.4321987},
                                "per_layer": [1, 2, 3]})
    run.write_json("alpha_sweep.json", {"table": [
        {"layer": 24, "site": "attn_out", "alpha": 0.3, "drop_pct": 41.2},
        {"layer": 24, "site": "mlp_out", "alpha": 0.5, "drop_pct": float("nan")}]})
    run.write_json("rq4.json", {"churn": {"headline": {"heads_changed": 17}}})
    run.write_json("misc.json", {"nothing": 1})
    plots.plot_map_quality([{"label": "L24", "r2_vw": 0.7, "cka": 0.8}], run.figure("maps.png"))
    html_path, md_path = write_report(tmp_path)
    h, md = html_path.read_text(), md_path.read_text()
    for text in (h, md):
        assert "planted-culture" in text and "tokhashB" in text and "def456" in text
        assert "RQ1: where do they diverge" in text and "min_cka_layer" in text and "0.4322" in text
        assert "attn_out" in text and "41.2" in text and "heads_changed" in text and "17" in text
        assert "misc.json" in text
    details = h[h.index('id="details"'):]
    assert details.index("RQ1") < details.index("attn_out") < details.index("heads_changed")  # known files first
    assert "| layer | site | alpha | drop_pct |" in md
    assert "![" in md and "(figures/maps.png)" in md
    b64 = base64.b64encode(run.figure("maps.png").read_bytes()).decode()
    assert f"data:image/png;base64,{b64}" in h
    assert "figures/maps.png\"" not in h.replace("(figures/maps.png)", "")  # no external src


def test_report_without_manifest(tmp_path):
    html_path, md_path = write_report(tmp_path)
    assert "No manifest.json" in html_path.read_text() and md_path.exists()


# ---------------------------------------------------------------- the study report (no models)
HOSTILE = '<script>alert("x")</script> [link](http://example.com) ![img](http://example.com/a.png) | *b*'


def fake_run(path, name="planted-cultural", *, entry=20, churn=0.05, min_k=2, r2=0.8):
    """A run directory with every stage's JSON in the shapes the stages write (small, made up), a pair
    whose description and a prompt category carry markup, and a manifest. Returns the RunDir."""
    run = RunDir(path)
    layers = list(range(0, 30, 2))
    run.write_manifest(build_manifest(
        pair={"name": name, "domain": "cultural", "description": HOSTILE, "base": {"spec": "smollm2"},
              "tuned": {"spec": "planted"}},
        models={"base": {"spec": "smollm2"}, "tuned": {"spec": "planted"}}, seeds={"seed": 0},
        options={"rq1": {"n_prompts": 16}, "mapped-patch": {}, "steer": {}, "heads": {}},
        command=["mechdiff", "run", "--pair", name]))
    kl = [0.0 if l < entry else 0.1 * (l - entry + 1) for l in layers]
    per = [{"layer": l, "mean": k, "se": 0.01 + 0.1 * k, "lower": k - 0.02} for l, k in zip(layers, kl)]
    cka = {"n": 16, "site": "resid_post", "per_layer": [
        {"layer": l, "debiased": 1 - 0.02 * max(0, l - entry), "biased": 1.0, "ci_low": 0.9 - 0.02 * max(0, l - entry),
         "ci_high": 1.0, "null_mean": 0.01, "null_sd": 0.02} for l in layers]}
    run.write_json("cka.json", cka)
    run.write_json("rq1.json", {
        "title": "RQ1 — fair baseline", "headline": {"prompts used": 16}, "planted_layers": [20, 22, 24],
        "layers": {"chosen": [entry, entry + 2, 28], "control": 8, "entry": entry, "basis": "patch KL: rule",
                   "evidence": {"floor": 0.0, "z": 2.0, "per_layer": per}},
        "behaviour": {"base": {"target": {"n": 8.0, "refusal_rate": 0.25, "soft_refusal": 0.1}, HOSTILE: {"n": 8.0}},
                      "tuned": {"target": {"n": 8.0, "refusal_rate": 0.5, "soft_refusal": 0.3}, HOSTILE: {"n": 8.0}},
                      "delta": {"target": {"refusal_rate": 0.25}}},
        "tables": {"behaviour (tuned - base)": [{"set": HOSTILE, "refusal_rate": 0.25}]}})
    run.write_json("maps.json", {"title": "RQ2 — transport maps", "table": [
        {"layer": 22, "site": "resid_post", "solver": "procrustes_scaled", "control_layer": False, "val_r2_vw": r2,
         "val_cka": 0.9, "identity_val_r2_vw": 0.5, "shuffle_val_r2_vw": -0.05},
        {"layer": 8, "site": "resid_post", "solver": "procrustes_scaled", "control_layer": True, "val_r2_vw": 0.99,
         "val_cka": 0.99, "identity_val_r2_vw": 0.98, "shuffle_val_r2_vw": -0.01}]})
    best = {"layer": 22, "site": "resid_post", "alpha": "0.5", "alpha_value": 0.5, "kl_raw": 0.4, "kl_mapped": 0.1,
            "delta": 0.3, "drop_pct": 75.0}
    controls = [{**best, "control": "bogus", "map_layer": 22, "layer": 8, "kl_mapped": 0.02, "drop_pct": None},
                {**best, "control": "shuffle", "map_layer": 22, "kl_mapped": 0.45, "drop_pct": -12.5}]
    run.write_json("alpha_sweep.json", {"title": "RQ2 — mapped patching", "table": [best, {**best, "alpha": "1.0"}],
                                        "tables": {"best per (layer, site)": [best], "controls": controls},
                                        "winner": best, "controls": controls, "stop_conditions": {"met": True},
                                        "headline": {"n_val": 8, "solver": "procrustes_scaled", "measure": "decision"}})
    run.write_json("variants.json", {"n_val": 8, "variants": [
        {"layer": 22, "site": "resid_post", "kind": "raw", "alpha": None, "kl_mean": 0.4, "kl_std": 0.08},
        {"layer": 22, "site": "resid_post", "kind": "mapped", "alpha": "0.5", "kl_mean": 0.1, "kl_std": 0.04}]})
    cell = lambda mode, kind, k, share, layer=22: {  # noqa: E731
        "layer": layer, "basis_layer": 22, "kind": kind, "fit_lang": None, "mode": mode, "k": k, "alpha": 1.0,
        "side": "tuned" if mode == "ablate" else "base", "test_share": share, "dev_share": share,
        "ppl_change_pct_unmasked": 0.5 * k, "mc_drop_pp_unmasked": 0.0, "within": True}
    chosen = [cell(m, kd, k, (0.3 * k if kd == "diff" else 0.01)) for m in ("steer", "ablate")
              for kd in ("diff", "random") for k in (1, 2, 3)]
    by_mode = {m: {"mode": m, "layer": 22, "kind": "diff", "minimal_k": min_k, "k_saturation": 3,
                   "cell": cell(m, "diff", min_k or 3, 0.6), "random": cell(m, "random", 2, 0.01),
                   "control_layer": cell(m, "diff", 2, 0.02, layer=8)} for m in ("steer", "ablate")}
    run.write_json("rq3.json", {"title": "RQ3 — causal handle", "headline": {"fit / dev / test prompts": "16 / 4 / 8"},
                                "options": {"gap_threshold": 0.1, "max_ppl_pct": 5.0, "max_mc_drop_pp": 5.0},
                                "result": {"status": "found" if min_k else "none does", "minimal_k": min_k,
                                           "by_mode": by_mode}, "chosen": chosen, "table": chosen})
    heads = [{"layer": l, "head": h, "attribution_base": 0.1 * h, "attribution_tuned": 0.1 * h + 0.05 * (l == 28),
              "own_change": 0.0} for l in (20, 28) for h in range(9)]
    run.write_json("rq4.json", {"title": "RQ4 — heads", "layers": [20, 28], "unit": "nats",
                                "headline": {"importance churn (attribution)": 0.1}, "heads": heads,
                                "thresholds": {"floor": 1e-5},
                                "churn": {"own": {"share": churn, "share_per_layer": [0.0, 2 * churn]},
                                          "attribution": {"churn": churn / 2, "topk_jaccard": 0.8, "spearman": 0.9,
                                                          "k": 4}},
                                "cumulative": {"ablate.base": {"mean": [0.1, 0.2, 0.25, 0.3], "sd": [0.05] * 4},
                                               "own.tuned": {"mean": [0.01, 0.02, 0.02, 0.03], "sd": [0.01] * 4}}})
    (run.path / "RUN.md").write_text(f"# How to reproduce\n\n```bash\nmechdiff run --pair {name}\n```\n")
    return run


def test_study_report_summary_figures_and_escaping(tmp_path):
    from mechdiff.report.summary import numbers, sentences
    run = fake_run(tmp_path / "run")
    html_path, md_path = write_report(run.path)
    h, md = html_path.read_text(), md_path.read_text()
    text = " ".join(s for _, s in sentences(run.path))
    # every interpretive sentence carries its uncertainty or control
    assert ("Divergence enters at layer 20 or earlier (after layer 18; layer 19 was not patched): patch KL 0.1 "
            "+- 0.02") in text and "self-patch floor 0" in text
    assert "95% CI" in text and "row-shuffled independence null" in text
    assert "vs control layer 8" in text
    assert "identity map's R2 0.5" in text and "shuffled targets R2 -0.05" in text
    assert "75% drop" in text and "bogus map" in text and "+- 0.014" in text      # 0.04 / sqrt(8)
    assert "minimal k = 2" in text and "random basis of the same k: 1.0%" in text and "limit 5%" in text and "MC accuracy change +0.0 pt (limit -5 pt)" in text
    assert "5.0% of 18 heads changed" in text and "Spearman 0.9" in text
    assert "diff +25.0 pp +- 21.4 SE, binomial" in text
    n = numbers(run.path)
    assert n["entry layer"] == 20 and n["best map R2"] == 0.8 and n["minimal k"] == 2 and n["mapped drop %"] == 75.0
    for key in ("a", "b", "c", "d"):
        assert f'id="figure-{key}"' in h and _is_png(run.path / "figures" / "report" / f"fig_{key}.png")
        assert f"(figures/report/fig_{key}.png)" in md
    assert h.count("data:image/png;base64,") == 4 and "Alpha-sweep summary" in h and "How to reproduce" in h
    # markup from the pair / prompt files is text, never markup, in both files
    assert "<script>" not in h and "&lt;script&gt;" in h and "http://example.com" not in h.replace(
        "[link](http://example.com)", "").replace("![img](http://example.com/a.png)", "")
    assert "<script>" not in md and "&lt;script&gt;" in md and "\\[link\\](http://example.com)" in md
    assert "!\\[img\\]" in md and "\\| \\*b\\*" in md


def test_report_figures_are_cached_and_redrawn_on_change(tmp_path):
    run = fake_run(tmp_path / "run")
    write_report(run.path)
    fig = run.path / "figures" / "report" / "fig_d.png"
    before = fig.stat().st_mtime_ns
    write_report(run.path)
    assert fig.stat().st_mtime_ns == before            # same data: not redrawn
    fake_run(tmp_path / "run", churn=0.5)
    write_report(run.path)
    assert fig.stat().st_mtime_ns != before


def test_compare_two_runs(tmp_path):
    import json

    from mechdiff.compare import compare_runs
    a = fake_run(tmp_path / "a", "planted-cultural", entry=20, churn=0.02, min_k=2, r2=0.9)
    b = fake_run(tmp_path / "b", "planted-cognitive", entry=4, churn=0.3, min_k=None, r2=0.4)
    out = compare_runs([a.path, b.path], out=tmp_path / "cmp")
    data = json.loads((out / "compare.json").read_text())
    rows = {r["quantity"]: r for r in data["table"]}
    assert rows["divergence enters at layer"]["planted-cultural"] == 20
    assert rows["divergence enters at layer"]["planted-cognitive"] == 4
    assert rows["changed heads (share)"]["planted-cognitive"] == 0.3
    assert ("share of changed heads (readout moves above the noise floor): planted-cultural 2.0% (noise floor 1e-05); "
            "planted-cognitive 30.0% (noise floor 1e-05).") in data["contrasts"]
    assert "minimal k of the rank-k handle: planted-cultural 2 (found); planted-cognitive n/a (none does)." \
        in data["contrasts"]
    h = (out / "compare.html").read_text()
    assert h.count("data:image/png;base64,") == 4 and "<script>" not in h
    assert "| divergence enters at layer | 20 | 4 |" in (out / "compare.md").read_text()
    with pytest.raises(Exception, match="two or more"):
        compare_runs([a.path])


def test_report_command_rebuilds_everything_from_the_artifacts(tmp_path):
    import shutil

    from typer.testing import CliRunner

    from mechdiff.cli import app
    run = fake_run(tmp_path / "run")
    write_report(run.path)
    shutil.rmtree(run.path / "figures")
    (run.path / "report.html").unlink()
    res = CliRunner().invoke(app, ["report", str(run.path)])
    assert res.exit_code == 0, res.output
    h = (run.path / "report.html").read_text()
    assert h.count("data:image/png;base64,") == 4 and "Divergence enters at layer 20" in h
    assert all(_is_png(run.path / "figures" / "report" / f"fig_{k}.png") for k in "abcd")
