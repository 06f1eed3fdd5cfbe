import base64
import math

import numpy as np
import pytest

from mechdiff import plots
from mechdiff.artifacts import RunDir
from mechdiff.manifest import build_manifest
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
    assert h.index("RQ1") < h.index("attn_out") < h.index("heads_changed")  # known files first
    assert "| layer | site | alpha | drop_pct |" in md
    assert "![" in md and "(figures/maps.png)" in md
    b64 = base64.b64encode(run.figure("maps.png").read_bytes()).decode()
    assert f"data:image/png;base64,{b64}" in h
    assert "figures/maps.png\"" not in h.replace("(figures/maps.png)", "")  # no external src


def test_report_without_manifest(tmp_path):
    html_path, md_path = write_report(tmp_path)
    assert "No manifest.json" in html_path.read_text() and md_path.exists()
