"""Response readout for layer patching (patching/response.py), known answers on a planted tiny pair:
a copy of a tiny Llama whose layer-2 MLP is changed. Patching base -> tuned at every position of
prompt + response: the patch KL (to the tuned model's own output) over the first K response tokens is
exactly 0 at the layers below the change (the tuned model reads the states it makes itself), where
nothing of the gap is closed, and the whole gap is closed at the last layer (the tuned model then
outputs the base's distribution)."""
from __future__ import annotations

import copy

import pytest
import torch

from mechdiff.errors import DataError
from mechdiff.patching.response import response_patch


@pytest.fixture(scope="module")
def planted_tiny():
    from mechdiff.models.tiny import tiny_model
    m, tok = tiny_model("llama", seed=0, n_layers=4)
    t = copy.deepcopy(m)
    with torch.no_grad():
        w = t.model.layers[2].mlp.down_proj.weight
        w.add_(0.2 * torch.randn(w.shape, generator=torch.Generator().manual_seed(1)))
    return m.eval(), t.eval(), tok


def _texts():
    g = torch.Generator().manual_seed(0)
    ids = [torch.randint(3, 250, (n,), generator=g).tolist() for n in (12, 9, 15, 10)]
    return ids, [6, 4, 9, 5]


def test_zero_below_the_planted_layer_and_closed_at_the_last(planted_tiny):
    base, tuned, tok = planted_tiny
    ids, rs = _texts()
    v = torch.arange(base.config.vocab_size)
    out = response_patch(base, tuned, tok, ids, rs, layers=[0, 1, 2, 3], k=3, src_ids=v, dst_ids=v, batch_size=3)
    assert (out["gap"] > 0).all()
    for l in (0, 1):
        assert torch.equal(out["patch_kl"][l], torch.zeros_like(out["patch_kl"][l])), l
        assert out["share_closed"][l] == pytest.approx(0.0, abs=1e-12)
    assert (out["patch_kl"][2] > 0).all() and (out["patch_kl"][3] > 0).all()
    assert torch.equal(out["to_src"][3], torch.zeros_like(out["to_src"][3])) and out["share_closed"][3] == 1.0


def test_reverse_direction_is_zero_below_the_change_too(planted_tiny):
    base, tuned, tok = planted_tiny
    ids, rs = _texts()
    v = torch.arange(base.config.vocab_size)
    out = response_patch(tuned, base, tok, ids, rs, layers=[1], k=3, src_ids=v, dst_ids=v)
    assert torch.equal(out["patch_kl"][1], torch.zeros_like(out["patch_kl"][1]))
    assert out["share_closed"][1] == pytest.approx(0.0, abs=1e-12)


def test_bad_inputs(planted_tiny):
    base, tuned, tok = planted_tiny
    v = torch.arange(base.config.vocab_size)
    with pytest.raises(DataError, match="k must be"):
        response_patch(base, tuned, tok, [[5, 6]], [1], layers=[0], k=0, src_ids=v, dst_ids=v)
    with pytest.raises(DataError, match="at least one prompt token"):
        response_patch(base, tuned, tok, [[5, 6]], [0], layers=[0], k=1, src_ids=v, dst_ids=v)
