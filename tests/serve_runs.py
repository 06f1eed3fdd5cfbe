"""Small run directories for the `mechdiff serve` tests (no stage runs: seconds to build).

``write_tokens`` writes a tokens stage result exactly as src/mechdiff/texts/result.py's docstring pins it
(tokens.json + tokens/per_token.safetensors; i23's stage writer had not landed when these tests were
written). ``build_runs`` makes two runs: "tiny" (two tiny random Llamas, seeds 0 and 1) and "self"
(the seed-0 Llama against itself, so its live KL is exactly 0), each with every stage's JSON
(test_plots_report.fake_run), a saved RQ3 handle and tokens texts, one of them carrying markup.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file
from test_plots_report import fake_run

from mechdiff.analyses.steering import Handle
from mechdiff.manifest import build_manifest
from mechdiff.models.tiny import tiny_model
from mechdiff.pairs import load_pair
from mechdiff.texts.result import SCHEMA, TOKEN_FIELDS, TextSummary

INJECT = '<img src=x onerror="window.__pwned=1"><b>bold</b>'
INT_FIELDS = {"start", "end", "rank_in_base", "rank_in_tuned"}


def write_tokens(run_dir: Path, texts: list[tuple[dict, list[tuple[int, int, float, float]]]]) -> None:
    """``texts``: ``(summary fields, rows)`` with rows ``(start, end, kl_bt, kl_tb)``; the other per-row
    fields are filled from the KLs (log-probs -kl, ranks 0, nothing dropped, full = masked)."""
    summaries, cols, offsets = [], {k: [] for k in TOKEN_FIELDS}, [0]
    for i, (fields, rows) in enumerate(texts):
        resp = [r for r in rows if r[0] >= fields.get("response_start", 0)] or rows
        summaries.append(asdict(TextSummary(idx=i, n_rows=len(rows), mean_kl_bt=sum(r[2] for r in resp) / len(resp),
                                            mean_kl_tb=sum(r[3] for r in resp) / len(resp), **fields)))
        for s, e, bt, tb in rows:
            vals = {"start": s, "end": e, "kl_bt": bt, "kl_tb": tb, "kl_bt_full": bt, "kl_tb_full": tb,
                    "dropped_base": 0.0, "dropped_tuned": 0.0, "logp_base": -bt, "logp_tuned": -tb,
                    "rank_in_base": 0, "rank_in_tuned": 1}
            for k in TOKEN_FIELDS:
                cols[k].append(vals[k])
        offsets.append(offsets[-1] + len(rows))
    (run_dir / "tokens").mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.tensor(v, dtype=torch.int64 if k in INT_FIELDS else torch.float32) for k, v in cols.items()}
    tensors["row_offsets"] = torch.tensor(offsets, dtype=torch.int64)
    save_file(tensors, str(run_dir / "tokens" / "per_token.safetensors"))
    (run_dir / "tokens.json").write_text(json.dumps({"schema": SCHEMA, "headline": {
        "texts": len(texts), "mean KL(base||tuned) over responses": {"mean": 0.2, "ci95": [0.1, 0.3]}},
        "texts": summaries}), encoding="utf-8")


def words(text: str, kls: list[float], start: int = 0) -> list[tuple[int, int, float, float]]:
    """Rows for the space-separated words of ``text[start:]``, the i-th with KL ``kls[i]`` (tb = half)."""
    rows, pos = [], start
    for kl, w in zip(kls, text[start:].split(" ")):
        rows.append((pos, pos + len(w), kl, kl / 2))
        pos += len(w) + 1
    return rows


def tiny_texts() -> list[tuple[dict, list]]:
    common = {"set": "prompts", "responder": "base", "category": "target", "coverage": 1.0}
    a = "Q: capital of France? A: Paris is the capital"
    b = f"Q: say {INJECT} A: the markup stays text"
    c = "the neutral text about rivers"
    return [({**common, "id": "p-fr", "lang": "en", "topic": "geography", "text": a, "response_start": a.index("Paris"),
              "unit": "token"},
             words(a, [0.0, 0.1, 0.1, 0.1, 0.0, 2.0, 0.3, 0.2, 0.1])),
            ({**common, "id": "p-markup", "lang": "de", "topic": "markup", "text": b, "response_start": b.index("A:"),
              "unit": "span", "coverage": 0.9}, words(b, [0.1] * 12)),
            ({**common, "id": "n-river", "set": "neutral", "responder": None, "lang": "en", "topic": "rivers", "text": c,
              "response_start": 0, "unit": "token"}, words(c, [0.01, 0.02, 0.01, 0.03, 0.02]))]


def build_runs(root: Path) -> list[Path]:
    """Two served runs under ``root`` (see the module docstring); returns their paths [tiny, self]."""
    for side, seed in (("base", 0), ("tuned", 1)):
        m, tok = tiny_model("llama", seed=seed, n_layers=4)
        m.save_pretrained(root / f"tiny-{side}")
        tok.save_pretrained(root / f"tiny-{side}")
    out = []
    for name, tuned in (("tiny <i>pair</i>", "tiny-tuned"), ("tiny-self", "tiny-base")):
        f = root / f"{tuned}-{len(out)}.toml"
        f.write_text(f'name = "{name}"\nbase = "{root / "tiny-base"}"\ntuned = "{root / tuned}"\ndtype = "float32"\n',
                     encoding="utf-8")
        pair = load_pair(f)
        run = fake_run(root / f"run{len(out)}", name=name, entry=20 + 2 * len(out))
        run.write_manifest(build_manifest(pair=pair.to_dict(), models={"base": {"spec": str(pair.base)},
                                          "tuned": {"spec": str(pair.tuned)}}, seeds={"seed": 0}, options={}))
        g = torch.Generator().manual_seed(len(out))
        basis = torch.linalg.qr(torch.randn(64, 2, generator=g))[0]
        Handle(layer=2, site="resid_post", basis=basis, mode="steer", alpha=8.0).save(
            run.path / "handles" / "L2_resid_post_diff_k2_steer")
        write_tokens(run.path, tiny_texts())
        (run.path / "report.html").write_text(f"<h1>report {INJECT}</h1><script>window.__pwned = 2</script>")
        out.append(run.path)
    return out
