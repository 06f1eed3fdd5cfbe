"""Activation-difference lens (analyses/diff_lens.py): known answers on tiny Llamas.

A model against itself: every layer's difference is exactly zero (no handle). A copy whose layer-2
MLP is changed: zero below layer 2, non-zero from layer 2 on, and the saved handle adds exactly the
mean difference."""
from __future__ import annotations

import copy

import pytest
import torch

from mechdiff.analyses.diff_lens import diff_lens, lens_handles
from mechdiff.analyses.steering import Handle
from mechdiff.errors import DataError
from mechdiff.models.load import LoadedModel
from mechdiff.pairs.model_spec import ModelSpec

TEXTS = [{"id": str(i), "text": t} for i, t in enumerate(
    ["the cat sat on the mat", "water boils at one hundred degrees", "a short note about trees", "hello there"])]


def _lm(model, tok):
    return LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path="/tiny"),
                       info={"n_layers": 4, "d_model": 64, "vocab_size": model.config.vocab_size})


@pytest.fixture(scope="module")
def tiny():
    from mechdiff.models.tiny import tiny_model
    m, tok = tiny_model("llama", seed=0, n_layers=4)
    return m.eval(), tok


def test_model_against_itself_is_exactly_zero(tiny):
    m, tok = tiny
    out = diff_lens(_lm(m, tok), _lm(m, tok), TEXTS, n_tokens=3, batch_size=2)
    assert torch.equal(out["delta"], torch.zeros_like(out["delta"])) and out["n"] == 12
    assert lens_handles(out["delta"]) == []


def test_zero_below_the_changed_layer_and_a_handle_that_adds_the_difference(tiny, tmp_path):
    m, tok = tiny
    t = copy.deepcopy(m)
    with torch.no_grad():
        t.model.layers[2].mlp.down_proj.weight.add_(0.05 * torch.randn_like(t.model.layers[2].mlp.down_proj.weight))
    out = diff_lens(_lm(m, tok), _lm(t, tok), TEXTS, n_tokens=3, batch_size=3, top=4)
    d = out["delta"]
    assert torch.equal(d[:2], torch.zeros_like(d[:2])) and (d[2:].norm(dim=-1) > 0).all()
    assert len(out["lens"][2]["tuned"]["promoted"]) == 4 and len(out["lens"][2]["base"]["suppressed"]) == 4
    hs = lens_handles(d)
    assert [h.layer for h in hs] == [2, 3]
    h = hs[0]
    h.save(tmp_path / "h")
    back = Handle.load(tmp_path / "h")
    assert back.mode == "add" and torch.allclose(back.scale * back.basis[:, 0], d[2], atol=1e-6)


def test_models_of_different_width_are_refused(tiny):
    m, tok = tiny
    other = _lm(m, tok)
    other.info = {**other.info, "d_model": 32}
    with pytest.raises(DataError, match="one shape"):
        diff_lens(_lm(m, tok), other, TEXTS)
