"""Exact do-nothing patches (issue 9): a patch that writes back the clean value, or patches a layer
both models share, gives KL == 0.0 exactly (bf16 and float32, every tiny family, both measures);
real patches still agree with the naive full recomputation."""
import copy

import pytest
import torch

from mechdiff.models.tiny import FAMILIES, tiny_model
from mechdiff.patching import Patch, PatchEngine, chunked_clean_states, kl_reducer, layer_sweep, patch_kl
from test_patching import CHAT, TEXTS, make_batch

KINDS = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_z")
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32}


def _model(family, dtype=torch.float32, seed=0):
    return tiny_model(family, n_layers=6 if family == "gemma3" else 4, dtype=dtype, seed=seed)


def _sites(L):
    return [f"{n}.{l}" for l in range(L) for n in KINDS]


def _width(eng, site):
    return eng.sm.n_heads * eng.sm.head_dim if site.startswith("head_z") else eng.sm.d_model


@pytest.mark.parametrize("measure", ["last", "decision"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_write_back_is_exactly_zero(family, dtype, measure):
    model, tok = _model(family, DTYPES[dtype])
    batch = make_batch(tok)
    L = model.config.num_hidden_layers
    sites = _sites(L)
    eng = PatchEngine(model, batch, measure=measure, record_sites=sites)
    states = eng.clean_states()
    kl = layer_sweep(eng, states)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in kl.values()), {s: v.max() for s, v in kl.items()}
    # the result of a no-op is the clean logits themselves, also without a reduce
    out = eng.run([Patch(s, v) for s, v in states.items()] + [[]])
    assert torch.equal(out, eng.clean_logits.expand_as(out))
    # a second engine on the same batch records the same states (lazily, for the sites not given)
    other = PatchEngine(model, batch, measure=measure)
    kl2 = patch_kl(other, [Patch(s, v) for s, v in states.items()])
    assert torch.equal(kl2, torch.zeros_like(kl2))


@pytest.mark.parametrize("measure", ["last", "decision"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_computed_noops_match_in_pass_reference(family, dtype, measure):
    """With no-op detection off the rows are computed: a patch that leaves the in-pass state as it is
    (replace with alpha 0, add of zeros, ablate with alpha 0, no patch) equals its pass's
    reference bit for bit, at every site and start layer: all in one pass, or in passes of 13 rows
    (with layer skipping off for "decision")."""
    model, tok = _model(family, DTYPES[dtype])
    batch = make_batch(tok)
    L = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(3)
    for kw in (dict(), dict(max_rows=13, skip_layers=measure == "last")):
        eng = PatchEngine(model, batch, measure=measure, detect_noops=False, **kw)
        B = len(batch)
        basis, _ = torch.linalg.qr(torch.randn(eng.sm.d_model, 2, generator=g))
        variants = []
        for i, s in enumerate(_sites(L)):
            w = _width(eng, s)
            variants.append(Patch(s, torch.randn(B, w, generator=g), alpha=0.0) if i % 2 else
                            Patch(s, torch.zeros(w), mode="add"))
        variants += [Patch(f"resid_post.{L - 2}", mode="ablate", basis=basis, alpha=0.0), []]
        if kw:   # many small passes: a third of the variants is enough
            variants = variants[::3]
        logits, ref = eng.run(variants, with_reference=True)
        assert torch.equal(logits, ref)
        if not kw:
            kl = patch_kl(eng, variants)
            assert torch.equal(kl, torch.zeros_like(kl))


def _perturbed_copy(model, first: int, seed: int = 5):
    """A copy of ``model`` whose blocks from ``first`` on are perturbed (the rest shared exactly)."""
    other = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    from mechdiff.sites.names import resolve
    with torch.no_grad():
        for block in resolve(other).blocks[first:]:
            for p in block.parameters():
                p.add_((p.float().std() * torch.randn(p.shape, generator=g)).to(p.dtype))
    return other


@pytest.mark.parametrize("measure", ["last", "decision"])
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", FAMILIES)
def test_shared_layers_exactly_zero(family, dtype, measure):
    """Cross-model patching between two copies that share the bottom blocks, in chunks of 4 prompts
    as ``patch_measure`` runs it, sources from ``chunked_clean_states``: KL == 0 exactly at every
    site of the shared blocks, > 0 from the first perturbed block on."""
    model_a, tok = _model(family, DTYPES[dtype])
    L = model_a.config.num_hidden_layers
    first = L // 2
    model_b = _perturbed_copy(model_a, first)
    from mechdiff.data.prompts import encode
    prompts = [{"id": str(i), "text": t} for i, t in enumerate(TEXTS)]
    sites = _sites(L)
    bs = 4
    kls = {}
    for src, dst in ((model_b, model_a), (model_a, model_b)):
        states = chunked_clean_states(src, tok, prompts, sites, batch_size=bs, measure=measure)
        assert states["resid_post.0"].dtype == DTYPES[dtype] and states["head_z.0"].shape[0] == len(prompts)
        parts = []
        for i in range(0, len(prompts), bs):
            eng = PatchEngine(dst, encode(tok, prompts[i:i + bs]), measure=measure)
            kl = layer_sweep(eng, {s: v[i:i + bs] for s, v in states.items()})
            parts.append(torch.stack([kl[s] for s in sites]))
        kls[id(dst)] = torch.cat(parts, 1)                        # [n_sites, N]
    for kl in kls.values():
        for j, s in enumerate(sites):
            name, layer = s.split(".")
            shared = int(layer) < first or (name == "resid_pre" and int(layer) == first)
            if shared:
                assert torch.equal(kl[j], torch.zeros_like(kl[j])), (s, kl[j])
            elif name == "resid_post" and int(layer) < L - 1:
                assert (kl[j].min() if measure == "decision" else kl[j].max()) > 0, (s, kl[j])
        assert kl.max() > 0


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("family", ["llama", "gemma3", "gpt2"])
def test_partial_noops_and_real_patches(family, dtype):
    """A variant that changes some prompts and not others: exactly 0 on the unchanged ones, the
    naive path's KL on the others (float32: the existing tolerance)."""
    model, tok = _model(family, DTYPES[dtype])
    batch = make_batch(tok)
    eng = PatchEngine(model, batch, record_sites=["resid_post.1", "mlp_out.2"])
    st = eng.clean_states()
    B = len(batch)
    g = torch.Generator().manual_seed(4)
    v1 = st["resid_post.1"].clone()
    v1[[0, 3]] = torch.randn(2, v1.shape[-1], generator=g).to(v1.dtype)
    add = torch.zeros(B, eng.sm.d_model)
    add[2] = torch.randn(eng.sm.d_model, generator=g)
    variants = [Patch("resid_post.1", v1), Patch("mlp_out.2", add, mode="add"),
                [Patch("mlp_out.2", st["mlp_out.2"]), Patch("resid_post.1", v1)]]
    kl = patch_kl(eng, variants)
    changed = [[0, 3], [2], [0, 3]]
    for i, rows in enumerate(changed):
        keep = [r for r in range(B) if r not in rows]
        assert torch.equal(kl[i, keep], torch.zeros(len(keep))), (i, kl[i])
        assert (kl[i, rows] > 0).all(), (i, kl[i])
    naive = eng.run_naive(variants, reduce=kl_reducer(eng))
    if dtype == "f32":
        assert torch.allclose(kl, naive, atol=1e-5, rtol=1e-3), (kl - naive).abs().max()
        fast = eng.run(variants)
        ref = eng.run_naive(variants)
        assert torch.allclose(fast, ref, atol=1e-4, rtol=1e-5), (fast - ref).abs().max()
    else:   # bf16: the same effects, within bf16 rounding of the effect itself
        assert torch.allclose(kl, naive, atol=1e-2, rtol=0.2), (kl, naive)


def test_noop_rows_are_not_computed(monkeypatch):
    """A sweep of no-ops runs no patched pass at all; a partial no-op computes only its changed rows
    (plus their references)."""
    import mechdiff.patching.engine as engine_mod
    model, tok = _model("llama")
    batch = make_batch(tok)
    eng = PatchEngine(model, batch, record_sites=["resid_post.0", "resid_post.2"])
    calls = []
    real = engine_mod.run_pass

    def counting(e, g, plan, prepared):
        calls.append(sum(len(s.rows) for s in plan.segs) + len(plan.refs))
        return real(e, g, plan, prepared)

    monkeypatch.setattr(engine_mod, "run_pass", counting)
    st = eng.clean_states()
    patch_kl(eng, [Patch(s, v) for s, v in st.items()])
    assert calls == []
    v = st["resid_post.2"].clone()
    v[1] += 1.0
    patch_kl(eng, [Patch("resid_post.0", st["resid_post.0"]), Patch("resid_post.2", v)])
    assert sum(calls) == 2   # one entry and its reference row


def test_old_style_reduce_still_works():
    model, tok = _model("qwen2")
    batch = make_batch(tok)
    eng = PatchEngine(model, batch, record_sites=["resid_post.1"])
    v = torch.randn(len(batch), eng.sm.d_model)
    variants = [Patch("resid_post.1", v), Patch("resid_post.1", eng.clean_states()["resid_post.1"])]
    top = eng.run(variants, reduce=lambda logits, rows: logits.argmax(-1))
    full = eng.run(variants)
    assert torch.equal(top, full.argmax(-1)) and torch.equal(top[1], eng.clean_logits.argmax(-1))
    # the fallback of kl_reducer without a reference (e.g. a caller passing its own rows)
    red = kl_reducer(eng)
    assert torch.equal(red(eng.clean_logits[None], torch.arange(len(batch))), torch.zeros(1, len(batch)))
    assert len(CHAT) == len(batch)
    # the naive path compares with its own clean forward: alpha 0 is exactly 0 there too
    kl = eng.run_naive([Patch("resid_post.1", v, alpha=0.0), Patch("resid_post.1", v)], reduce=kl_reducer(eng))
    assert torch.equal(kl[0], torch.zeros(len(batch))) and (kl[1] > 0).all()


@pytest.mark.parametrize("family", FAMILIES)
def test_final_block_on_last_position_only(family):
    """At the ``last`` readout the final block's output projection and MLP run on the last position
    only, and a patch after the final block's keys/values (head_z/attn_out/mlp_out/resid_post of the
    last layer) cannot reach a later position: exactly 0 where the prompt has a template tail, a real
    effect where the decision token is the last one; the engine still equals the naive recomputation."""
    model, tok = _model(family)
    batch = make_batch(tok)
    L, B, T = model.config.num_hidden_layers, len(batch), batch.input_ids.shape[1]
    tail = batch.decision < T - 1
    assert tail.any() and (~tail).any()
    eng = PatchEngine(model, batch, measure="last", detect_noops=False)
    d = eng.sm.d_model
    g = torch.Generator().manual_seed(0)
    variants = [Patch(f"resid_post.{L - 2}", torch.randn(B, d, generator=g)),
                [Patch(f"mlp_out.{L - 1}", torch.randn(B, d, generator=g)),
                 Patch(f"attn_out.{L - 2}", torch.randn(B, d, generator=g))],
                Patch(f"mlp_out.{L - 1}", torch.randn(B, d, generator=g)),
                Patch(f"resid_post.{L - 1}", torch.randn(B, d, generator=g)),
                Patch(f"head_z.{L - 1}", torch.randn(B, eng.sm.n_heads * eng.sm.head_dim, generator=g))]
    widths = []
    h = eng.sm.ffn[L - 1].register_forward_hook(lambda m, a, o: widths.append(o.shape[1]))
    try:
        fast = eng.run(variants)
    finally:
        h.remove()
    assert 1 in widths                    # a pass ran the final MLP on one position
    naive = eng.run_naive(variants)
    assert torch.allclose(fast, naive, atol=1e-4, rtol=1e-5), (fast - naive).abs().max()
    kl = patch_kl(eng, variants)
    assert (kl[:2].min() > 1e-6).item()
    for v in (2, 3, 4):                   # the final-layer patches: exactly 0 where a tail follows
        assert torch.equal(kl[v, tail], torch.zeros_like(kl[v, tail]))
        assert (kl[v, ~tail] > 1e-6).all()
