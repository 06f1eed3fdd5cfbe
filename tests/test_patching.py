"""The patching engine: cache-reusing batched runs equal the naive full recomputation (float32)."""
import copy

import pytest
import torch

from mechdiff.data.prompts import Batch
from mechdiff.errors import NumericsError, SiteError
from mechdiff.models.tiny import FAMILIES, tiny_model
from mechdiff.patching import Patch, PatchEngine, layer_sweep, patch_kl

TEXTS = ["What is the capital of France?", "hi", "Tell me a short story about a dragon", "2+2=",
         "Why is the sky blue", "ok then"]
CHAT = [True, True, False, True, False, True]  # mixed template tails: different suffix lengths


def make_batch(tok, texts=TEXTS, chat=CHAT) -> Batch:
    """Left-padded batch; decision = last content token (before the chat-template tail)."""
    seqs, decs = [], []
    for text, c in zip(texts, chat):
        if c:
            full = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                           add_generation_prompt=True)
            head = full[:full.index(text) + len(text)]
            ids = tok(full, add_special_tokens=False).input_ids
            dec = len(tok(head, add_special_tokens=False).input_ids) - 1
        else:
            ids = tok(text, add_special_tokens=False).input_ids
            dec = len(ids) - 1
        seqs.append(ids)
        decs.append(dec)
    T = max(map(len, seqs))
    B = len(seqs)
    input_ids = torch.full((B, T), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros(B, T, dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, T - len(s):] = torch.tensor(s)
        mask[i, T - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    dec = torch.tensor([d + T - len(s) for d, s in zip(decs, seqs)])
    return Batch(input_ids, mask, pos, dec, ids=list(range(B)))


def _model(family, **kw):
    n_layers = 6 if family == "gemma3" else 4  # gemma3: 5 sliding-window layers + 1 global
    return tiny_model(family, n_layers=n_layers, **kw)


def _variants(sm, B, g):
    d, H, hd = sm.d_model, sm.n_heads, sm.head_dim
    L = sm.n_layers
    basis, _ = torch.linalg.qr(torch.randn(d, 3, generator=g))
    hbasis, _ = torch.linalg.qr(torch.randn(H * hd, 2, generator=g))
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return [
        Patch("resid_post.1", r(B, d)),
        Patch(("attn_out", 2), r(B, d), mode="add", alpha=0.5),
        Patch("mlp_out.0", mode="ablate", basis=basis),
        Patch("resid_pre.3", r(B, d), alpha=0.7),
        Patch("head_z.1", r(B, H, hd)),
        Patch("head_z.2", mode="ablate", basis=hbasis, alpha=1.0),
        Patch(f"resid_post.{L - 1}", r(d), mode="add", alpha=3.0),   # one steering vector for all
        [Patch("attn_out.0", r(B, d)), Patch("mlp_out.2", r(B, d), mode="add")],  # two sites at once
        [],                                                        # clean through the batched path
        Patch("resid_pre.0", r(B, d)),
    ]


@pytest.mark.parametrize("measure", ["last", "decision"])
@pytest.mark.parametrize("family", FAMILIES)
def test_engine_equals_naive(family, measure):
    model, tok = _model(family)
    batch = make_batch(tok)
    eng = PatchEngine(model, batch, measure=measure)
    assert len({int(g.p) for g in eng.groups}) > 1  # rows really fall in several suffix groups
    g = torch.Generator().manual_seed(1)
    variants = _variants(eng.sm, len(batch), g)
    fast = eng.run(variants)
    ref = eng.run_naive(variants)
    assert fast.shape == (len(variants), len(batch), model.config.vocab_size)
    assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-5), (fast - ref).abs().max()
    # clean logits equal a plain forward, and the empty variant equals clean
    assert torch.allclose(eng.clean_logits, ref[-2], atol=1e-4, rtol=1e-5)
    assert torch.allclose(fast[-2], eng.clean_logits, atol=1e-4, rtol=1e-5)
    assert not eng.packed  # the packed layout is gone (passes stack rows along the batch)
    # without layer skipping, and with variants stacked along the batch (repeated cache): same answer
    for kw in (dict(skip_layers=False), dict(packed=False), dict(packed=False, skip_layers=False)):
        other = PatchEngine(model, batch, measure=measure, **kw).run(variants)
        assert torch.allclose(other, ref, atol=1e-4, rtol=1e-5), (kw, (other - ref).abs().max())
    # every patch really changes something (the comparison is not vacuous)
    assert all((fast[i] - eng.clean_logits).abs().max() > 1e-3 for i in range(len(variants)) if i != 8)


@pytest.mark.parametrize("family", FAMILIES)
def test_self_patch_is_identity(family):
    model, tok = _model(family)
    batch = make_batch(tok)
    L = model.config.num_hidden_layers
    sites = [f"{n}.{l}" for l in range(L) for n in ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_z")]
    eng = PatchEngine(model, batch, record_sites=sites)
    states = eng.clean_states()
    assert states["resid_post.1"].shape == (len(batch), model.config.hidden_size if family != "gpt2" else 64)
    assert states["head_z.0"].shape == (len(batch), eng.sm.n_heads, eng.sm.head_dim)
    kl = layer_sweep(eng, states)
    for s, v in kl.items():
        assert v.shape == (len(batch),)
        assert v.max() < 1e-6, (s, v)
    # replace with alpha=0 and add of zeros leave the output exactly at clean too
    logits = eng.run([Patch("resid_post.2", torch.randn(len(batch), eng.sm.d_model), alpha=0.0),
                      Patch("mlp_out.1", torch.zeros(eng.sm.d_model), mode="add")])
    assert torch.allclose(logits, eng.clean_logits.expand_as(logits), atol=1e-5)


def test_planted_difference_found_from_layer_2():
    model_a, tok = tiny_model("llama", n_layers=4)
    model_b = copy.deepcopy(model_a)
    with torch.no_grad():
        for p in model_b.model.layers[2].mlp.parameters():
            p.add_(0.5 * torch.randn_like(p))
    batch = make_batch(tok)
    sites = [f"resid_post.{l}" for l in range(4)]
    # at the decision token itself: layers 0, 1 identical, from layer 2 on B's states move A
    eng_a = PatchEngine(model_a, batch, measure="decision")
    eng_b = PatchEngine(model_b, batch, measure="decision", record_sites=sites)
    kl = layer_sweep(eng_a, eng_b.clean_states(sites))
    assert kl["resid_post.0"].max() < 1e-6 and kl["resid_post.1"].max() < 1e-6
    assert kl["resid_post.2"].min() > 1e-4 and kl["resid_post.3"].min() > 1e-4
    # the final layer's state carries all of B's output at that position
    assert torch.allclose(eng_a.run([Patch("resid_post.3", eng_b.clean_states(["resid_post.3"])["resid_post.3"])])[0],
                          eng_b.clean_logits, atol=1e-4)
    # at the last position (after the chat tail): still 0 before layer 2, an effect from layer 2
    kl_last = layer_sweep(PatchEngine(model_a, batch), eng_b.clean_states(sites))
    assert kl_last["resid_post.0"].max() < 1e-6 and kl_last["resid_post.1"].max() < 1e-6
    assert kl_last["resid_post.2"].min() > 1e-5
    # a final-layer patch at the decision token cannot reach a later position: exactly 0 for chat rows
    chat_rows = torch.tensor(CHAT)
    assert kl_last["resid_post.3"][chat_rows].max() < 1e-6


@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_cache_not_mutated_and_chunking(family):
    model, tok = _model(family)
    batch = make_batch(tok)
    g = torch.Generator().manual_seed(2)
    variants = _variants(resolve_sm(model), len(batch), g)
    eng = PatchEngine(model, batch, max_rows=1000)
    first = eng.run(variants)
    second = eng.run(variants)
    assert torch.equal(first, second)
    one_per_pass = PatchEngine(model, batch, max_rows=1).run(variants)  # 1 prompt x 1 variant per pass
    assert torch.allclose(first, one_per_pass, atol=1e-4, rtol=1e-5)
    few = PatchEngine(model, batch, max_rows=7).run(variants)
    assert torch.allclose(first, few, atol=1e-4, rtol=1e-5)
    stacked = PatchEngine(model, batch, max_rows=7, packed=False)
    assert torch.equal(stacked.run(variants), stacked.run(variants))
    assert torch.allclose(stacked.run(variants), first, atol=1e-4, rtol=1e-5)


def resolve_sm(model):
    from mechdiff.sites.names import resolve
    return resolve(model)


def test_patch_kl_masked_and_positions_all():
    model, tok = tiny_model("qwen2")
    batch = make_batch(tok)
    eng = PatchEngine(model, batch)
    v = torch.randn(len(batch), eng.sm.d_model)
    kl = patch_kl(eng, [Patch("resid_post.1", v), []])
    assert kl.shape == (2, len(batch)) and kl[0].min() > 0 and kl[1].max() < 1e-6
    allowed = list(range(97, 123))
    klm = patch_kl(eng, [Patch("resid_post.1", v)], allowed_ids=allowed)
    assert klm.shape == (1, len(batch)) and torch.isfinite(klm).all()
    # every position: naive path; alpha=0 is clean, a real steering vector changes the output
    steer = torch.randn(eng.sm.d_model)
    out = eng.run([Patch("resid_post.0", steer, mode="add", alpha=0.0), Patch("resid_post.0", steer, mode="add")],
                  positions="all")
    assert torch.allclose(out[0], eng.clean_logits, atol=1e-4)
    assert (out[1] - eng.clean_logits).abs().max() > 1e-3
    dec_only = eng.run([Patch("resid_post.0", steer, mode="add")])
    assert (out[1] - dec_only[0]).abs().max() > 1e-4  # earlier positions matter for the last token


def test_validation_errors():
    model, tok = tiny_model("llama")
    batch = make_batch(tok)
    eng = PatchEngine(model, batch, record_sites=["resid_post.1"])
    B, d = len(batch), eng.sm.d_model
    with pytest.raises(SiteError, match="mapped"):
        eng.run([Patch("resid_post.1", torch.randn(B, d + 8))])
    with pytest.raises(SiteError, match="mapped-patch"):
        layer_sweep(eng, {"resid_post.1": torch.randn(B, 2 * d)})
    bad = torch.randn(B, d)
    bad[1, 3] = float("nan")
    with pytest.raises(NumericsError, match=r"value for resid_post\.1 contains NaN"):
        eng.run([Patch("resid_post.0", torch.randn(B, d)), Patch("resid_post.1", bad)])   # the bad one named
    basis = torch.full((d, 2), float("inf"))
    with pytest.raises(NumericsError, match=r"basis for mlp_out\.0 contains NaN/Inf"):
        eng.run([Patch("resid_post.1", bad), Patch("mlp_out.0", mode="ablate", basis=basis)][::-1])
    with pytest.raises(SiteError, match="out of range"):
        eng.run([Patch("resid_post.4", torch.randn(B, d))])
    with pytest.raises(SiteError):
        eng.run([Patch("head_out.1", torch.randn(B, d))])
    with pytest.raises(SiteError, match="record_sites"):
        eng.clean_states(["mlp_out.0"])
    with pytest.raises(SiteError):
        eng.run([Patch("resid_post.1", torch.randn(B + 1, d))])
