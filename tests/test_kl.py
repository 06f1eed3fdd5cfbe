"""KL on logits: known values, non-negativity, -inf handling, fairness under tokenizer extension."""

import math

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from mechdiff.patching.kl import kl_from_logits, kl_masked, kl_shared, summarise
from mechdiff.errors import NumericsError
from mechdiff.fairness import shared_vocab


def _sp_tok(pieces):
    vocab = {"<unk>": 0, "<pad>": 1}
    for p in pieces:
        vocab[p] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="never")
    t.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=t, unk_token="<unk>", pad_token="<pad>")


def test_kl_zero_and_known_value():
    torch.manual_seed(0)
    p = torch.randn(5, 11)
    assert torch.allclose(kl_from_logits(p, p), torch.zeros(5), atol=1e-6)
    # Bernoulli: P=(0.5,0.5), Q=(0.25,0.75) -> 0.5 ln2 + 0.5 ln(2/3)
    pl = torch.log(torch.tensor([[0.5, 0.5]]))
    ql = torch.log(torch.tensor([[0.25, 0.75]]))
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)
    assert kl_from_logits(pl, ql).item() == pytest.approx(want, abs=1e-6)


def test_kl_nonnegative_and_shapes():
    torch.manual_seed(1)
    p, q = torch.randn(3, 4, 50, dtype=torch.bfloat16), torch.randn(3, 4, 50, dtype=torch.bfloat16)
    kl = kl_from_logits(p, q)
    assert kl.shape == (3, 4) and kl.dtype == torch.float32
    assert (kl >= 0).all() and (kl > 0).all()


def test_kl_neg_inf_handling():
    p = torch.tensor([[0.0, 1.0, float("-inf")]])
    q = torch.tensor([[1.0, 0.0, float("-inf")]])
    kl = kl_from_logits(p, q)
    assert torch.isfinite(kl).all() and kl.item() > 0
    # P puts mass where Q has none -> +inf, not NaN
    assert math.isinf(kl_from_logits(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, float("-inf")]])).item())
    with pytest.raises(NumericsError):
        kl_from_logits(torch.full((1, 3), float("-inf")), torch.zeros(1, 3))


def test_kl_masked_renormalises():
    torch.manual_seed(2)
    p = torch.randn(4, 10)
    q = p.clone()
    q[:, 7:] += 8.0  # only disallowed tokens differ
    allowed = list(range(7))
    assert (kl_from_logits(p, q) > 0.1).all()
    assert torch.allclose(kl_masked(p, q, allowed), torch.zeros(4), atol=1e-6)


def test_extended_tokenizer_cannot_inflate_kl():
    base = _sp_tok(["▁a", "▁b", "▁c", "▁d", "▁e"])
    tuned = _sp_tok(["▁a", "▁b", "▁c", "▁d", "▁e", "▁қазақ", "▁ауыл", "▁той"])  # appended tokens
    sv0 = shared_vocab(base, base)
    sv = shared_vocab(base, tuned)
    assert torch.equal(sv.a_ids, sv0.a_ids) and torch.equal(sv.b_ids, sv0.a_ids)
    torch.manual_seed(3)
    p = torch.randn(6, len(base))
    q_same = p + 0.3 * torch.randn(6, len(base))
    q_ext = torch.cat([q_same, torch.full((6, 3), 6.0)], dim=-1)  # tuned puts mass on new tokens
    k0 = kl_shared(p, q_same, sv0.a_ids, sv0.b_ids)
    k1 = kl_shared(p, q_ext, sv.a_ids, sv.b_ids)
    assert torch.allclose(k0, k1, atol=1e-6)
    # the unfair comparison (pad P with -inf on the new ids) sees a large extra divergence
    p_pad = torch.cat([p, torch.full((6, 3), float("-inf"))], dim=-1)
    unfair = kl_from_logits(q_ext, p_pad)
    assert torch.isinf(unfair).all()
    assert (kl_from_logits(p_pad, q_ext) > k0 + 1.0).all()


def test_summarise():
    s = summarise(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert s["n"] == 4 and s["mean"] == 2.5 and s["median"] == 2.5
    assert s["std"] == pytest.approx(math.sqrt(5 / 3))
    s2 = summarise([1.0, float("inf"), 5.0])
    assert s2["n"] == 2 and s2["n_nonfinite"] == 1 and s2["mean"] == 3.0
    assert summarise([7.0])["std"] == 0.0


def test_patch_kl_against_one_shared_reference_checks_nan():
    """kl_reducer's path for one reference shared by every variant equals kl_from_logits row by row
    (exactly 0 for a copy of the reference), and NaN logits are an error, not a silent 0."""
    import pytest

    from mechdiff.errors import NumericsError
    from mechdiff.patching.kl import _kl_shared_ref
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(3, 50, generator=g)
    q = torch.stack([ref, torch.randn(3, 50, generator=g), ref + 0.1 * torch.randn(3, 50, generator=g)])
    got = _kl_shared_ref(ref, q)
    want = kl_from_logits(ref.expand_as(q), q)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-5)
    assert torch.equal(got[0], torch.zeros(3)) and (got[1:] > 0).all()
    bad = q.clone()
    bad[1, 2, 7] = float("nan")
    with pytest.raises(NumericsError, match="NaN"):
        _kl_shared_ref(ref, bad)
    ref_bad = ref.clone()
    ref_bad[0] = float("-inf")
    with pytest.raises(NumericsError, match="-inf everywhere"):
        _kl_shared_ref(ref_bad, q)
    # masked to allowed ids, with the unmasked KL beside it: kl_masked / kl_from_logits row by row
    allowed = [1, 4, 9, 30]
    both = _kl_shared_ref(ref, q, allowed, with_unmasked=True)
    assert both.shape == (3, 3, 2)
    assert torch.allclose(both[..., 0], kl_masked(ref.expand_as(q), q, allowed), atol=1e-6, rtol=1e-5)
    assert torch.allclose(both[..., 1], want, atol=1e-6, rtol=1e-5)
    assert torch.equal(both[0], torch.zeros(3, 2))
    with pytest.raises(NumericsError, match="-inf everywhere"):
        _kl_shared_ref(ref, q, [])
