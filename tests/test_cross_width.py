"""Cross-width mapped patching end to end (issue 10, item 5): SmolLM2-135M (30 layers, d=576, 49k-token
vocabulary) against Gemma-3-270M (18 layers, d=640, 262k tokens) through the CLI, small counts
(about a minute on one CPU core)."""
from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from mechdiff.cli import app


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


@pytest.fixture(scope="module")
def cross_width(tmp_path_factory):
    out = tmp_path_factory.mktemp("cross_width") / "run"
    res = CliRunner().invoke(app, ["mapped-patch", "--pair", "smollm2-vs-gemma3", "--n-train", "16", "--n-val", "8",
                                   "--min-shared-ratio", "0.85", "--layers", "10", "--sites", "resid_post",
                                   "--side-n", "4", "--device", "cpu", "--out", str(out)],
                             env={"COLUMNS": "400", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return res, out


@pytest.mark.real
def test_mapped_patch_runs_end_to_end_across_widths_and_tokenizers(cross_width):
    res, out = cross_width
    assert res.exit_code == 0, res.output
    assert "mapped patching done" in res.output and "Traceback" not in res.output
    for f in ("maps.json", "variants.json", "side_effects.json", "alpha_sweep.json", "rq2_summary.txt",
              "report.html", "maps/L10_resid_post_procrustes_scaled.json"):
        assert (out / f).is_file(), f
    maps = json.loads((out / "maps.json").read_text())["table"]
    assert {r["layer"] for r in maps} >= {10} and all(_finite(r["val_r2_vw"]) and _finite(r["val_cka"]) for r in maps)
    variants = json.loads((out / "variants.json").read_text())
    assert variants["n_val"] == 8
    kinds = {v["kind"] for v in variants["variants"]}
    assert "raw" not in kinds and {"mapped", "control_map", "bogus", "shuffle"} <= kinds   # no raw patch across widths
    assert all(_finite(v["kl_mean"]) and v["kl_mean"] >= 0 and _finite(v["kl_unmasked_mean"])
               for v in variants["variants"])
    sweep = json.loads((out / "alpha_sweep.json").read_text())
    assert sweep["winner"]["layer"] == 10 and _finite(sweep["winner"]["kl_mapped"])
    assert sweep["winner"]["kl_raw"] is None and sweep["winner"]["drop_pct"] is None
    side = json.loads((out / "side_effects.json").read_text())["table"]
    assert len(side) == 1 and all(_finite(side[0][k]) for k in
                                  ("d_refusal_pp_unmasked", "d_refusal_pp_masked", "d_mc_dlogp_unmasked"))
    text = (out / "rq2_summary.txt").read_text()
    # the raw KL is undefined (no raw patch between widths), not zero: said so, never a blank cell
    assert "n/a: no raw patch (widths differ)" in text and "no gap" not in text
    assert "KL     n/a -> " not in text and "KL n/a -> " in text
