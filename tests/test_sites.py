"""sites.names / sites.hooks on every tiny family: known answers from the model's own structure."""
from __future__ import annotations

import pytest
import torch

from mechdiff.data.prompts import encode
from mechdiff.errors import SiteError
from mechdiff.models.tiny import FAMILIES, tiny_model
from mechdiff.sites import (StopForward, hooked, intervene, record, replace_at, resolve,
                            validate_sites)

PROMPTS = ["The quick brown fox jumps", "Hi", "A somewhat longer prompt, with punctuation!"]


@pytest.fixture(scope="module", params=FAMILIES)
def fam(request):
    model, tok = tiny_model(request.param)
    return request.param, model, tok, encode(tok, PROMPTS)


def _hooks(model):
    """Every forward (pre-)hook on the model. transformers 5 installs its own, persistent output-
    capturing hooks the first time output_hidden_states is asked for; those are not ours."""
    return {(n, kind, k) for n, m in model.named_modules()
            for kind, d in (("fwd", m._forward_hooks), ("pre", m._forward_pre_hooks))
            for k, fn in d.items() if "output_capturing" not in getattr(fn, "__qualname__", "")}


def _no_hooks(model):
    return not _hooks(model)


@torch.no_grad()
def test_validate_sites_left_padded(fam):
    _, model, _, b = fam
    validate_sites(model, b.input_ids, b.attention_mask)
    assert _no_hooks(model)


@torch.no_grad()
def test_residual_decomposition(fam):
    """resid_post = resid_pre + attn_out + mlp_out (also for GPT-NeoX's parallel residual)."""
    _, model, _, b = fam
    sm = resolve(model)
    sites = [f"{s}.{l}" for l in range(sm.n_layers) for s in ("resid_pre", "resid_post", "attn_out", "mlp_out")]
    with record(model, sites) as rec:
        model(**b.model_inputs())
    m = b.attention_mask.bool()
    for l in range(sm.n_layers):
        lhs = rec[f"resid_post.{l}"][m]
        rhs = (rec[f"resid_pre.{l}"] + rec[f"attn_out.{l}"] + rec[f"mlp_out.{l}"])[m]
        torch.testing.assert_close(lhs, rhs, atol=1e-5, rtol=1e-5)
        if l + 1 < sm.n_layers:
            torch.testing.assert_close(rec[f"resid_post.{l}"], rec[f"resid_pre.{l + 1}"])


@torch.no_grad()
def test_head_out_sums_to_attention_branch(fam):
    """sum_h head_out + o_proj bias = o_proj output = the attention branch before any post-norm."""
    family, model, _, b = fam
    sm = resolve(model)
    for l in (0, sm.n_layers - 1):
        got = {}
        h = sm.oproj[l].register_forward_hook(lambda mod, a, out: got.__setitem__("o", out))
        try:
            with record(model, [f"head_out.{l}", f"attn_out.{l}"]) as rec:
                model(**b.model_inputs())
        finally:
            h.remove()
        ho = rec[f"head_out.{l}"]
        assert ho.shape == (*b.input_ids.shape, sm.n_heads, sm.d_model)
        bias = sm.oproj[l].bias
        total = ho.sum(-2) + (bias if bias is not None else 0)
        torch.testing.assert_close(total, got["o"], atol=1e-5, rtol=1e-5)
        if family == "gemma3":  # sandwich norm: attn_out is the post-normed branch
            blk = sm.blocks[l]
            torch.testing.assert_close(blk.post_attention_layernorm(total), rec[f"attn_out.{l}"],
                                       atol=1e-5, rtol=1e-5)
        else:
            torch.testing.assert_close(total, rec[f"attn_out.{l}"], atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_hooks_removed_after_exception_and_stop(fam):
    _, model, _, b = fam
    with pytest.raises(RuntimeError, match="boom"):
        with record(model, ["resid_post.1", "head_out.0"]):
            model(**b.model_inputs())
            raise RuntimeError("boom")
    assert _no_hooks(model)
    with pytest.raises(RuntimeError, match="boom"):
        with intervene(model, {"resid_pre.2": lambda t: t}):
            raise RuntimeError("boom")
    assert _no_hooks(model)
    # StopForward: the pass ends after resid_post.1, the block exits cleanly, later layers untouched.
    ran = []
    sm = resolve(model)
    h = sm.blocks[2].register_forward_hook(lambda *a: ran.append(1))
    try:
        with record(model, ["resid_post.1"], stop_after_last=True) as rec:
            model(**b.model_inputs())
            pytest.fail("the forward pass should have stopped")
    finally:
        h.remove()
    assert not ran and "resid_post.1" in rec
    assert _no_hooks(model)
    with pytest.raises(StopForward):  # raised outside hooked(): not swallowed
        raise StopForward


def test_site_errors(fam):
    family, model, _, _ = fam
    with pytest.raises(SiteError, match=r"0\.\.3"):
        with record(model, ["resid_post.4"]):
            pass
    with pytest.raises(SiteError, match=r"0\.\.3"):
        with record(model, [("attn_out", -1)]):
            pass
    with pytest.raises(SiteError, match="known sites"):
        with record(model, ["resid_mid.1"]):
            pass
    with pytest.raises(SiteError, match="read-only"):
        with intervene(model, {"head_out.0": lambda t: t}):
            pass
    assert _no_hooks(model)


@torch.no_grad()
def test_intervene_changes_only_later_layers(fam):
    _, model, _, b = fam
    sm = resolve(model)
    L = 1
    sites = [f"resid_post.{l}" for l in range(sm.n_layers)]
    with record(model, sites) as clean:
        ref_logits = model(**b.model_inputs()).logits
    values = torch.randn(len(b), sm.d_model) * 5
    with intervene(model, {f"resid_post.{L}": replace_at(values, b.decision)}), \
            record(model, sites) as patched:
        logits = model(**b.model_inputs()).logits
    rows = torch.arange(len(b))
    for l in range(L):
        torch.testing.assert_close(patched[f"resid_post.{l}"], clean[f"resid_post.{l}"])
    torch.testing.assert_close(patched[f"resid_post.{L}"][rows, b.decision], values)
    for l in range(L + 1, sm.n_layers):
        assert not torch.allclose(patched[f"resid_post.{l}"][rows, b.decision],
                                  clean[f"resid_post.{l}"][rows, b.decision])
    # Causality: real positions before the decision are unchanged at every layer (pad rows may
    # attend anywhere: eager attention spreads a fully masked row uniformly).
    before = (torch.arange(b.input_ids.shape[1])[None, :] < b.decision[:, None]) & b.attention_mask.bool()
    for l in range(sm.n_layers):
        torch.testing.assert_close(patched[f"resid_post.{l}"][before], clean[f"resid_post.{l}"][before])
    assert not torch.allclose(logits[rows, b.decision], ref_logits[rows, b.decision])
    assert _no_hooks(model)


def test_hooked_reads_see_edits(fam):
    _, model, _, b = fam
    with torch.no_grad(), hooked(model, read=["resid_pre.2"], edit={"resid_pre.2": lambda t: t * 0}) as rec:
        model(**b.model_inputs())
    assert (rec["resid_pre.2"] == 0).all()


def test_site_key_type_parse_str_order_hash():
    from mechdiff.sites import Site, parse_site, site_str, sites_at
    s = Site.parse("resid_post.12")
    assert s == Site("resid_post", 12) == Site.parse(("resid_post", "12")) == Site.parse(s)
    assert str(s) == "resid_post.12" == site_str(s) == site_str(("resid_post", 12))
    assert f"base/val/{s}" == "base/val/resid_post.12"          # the artifact key form is unchanged
    assert parse_site(s) == ("resid_post", 12) == parse_site("resid_post.12")
    name, layer = s
    assert (name, layer) == ("resid_post", 12) and s.at(3) == Site("resid_post", 3)
    assert sorted([Site("mlp_out", 10), Site("mlp_out", 2), Site("attn_out", 5)]) == \
        [Site("attn_out", 5), Site("mlp_out", 2), Site("mlp_out", 10)]
    assert len({s, Site("resid_post", 12), Site.parse("resid_post.12")}) == 1
    assert {str(k): 1 for k in sites_at("mlp_out", [1, 2])} == {"mlp_out.1": 1, "mlp_out.2": 1}
    with pytest.raises(AttributeError):
        s.layer = 3  # frozen
    for bad in ("resid_post", "resid_post.x", ".3", ("resid_post",), 12):
        with pytest.raises(SiteError):
            Site.parse(bad)


def test_site_keys_accepted_by_hooks_and_capture():
    from mechdiff.sites import Site, capture
    model, tok = tiny_model("llama")
    batch = encode(tok, PROMPTS)
    with torch.no_grad(), record(model, [Site("resid_post", 1), "mlp_out.0"]) as rec:
        model(**batch.model_inputs())
    assert set(rec) == {"resid_post.1", "mlp_out.0"}
    assert torch.equal(rec[Site("resid_post", 1)], rec["resid_post.1"])
    cap = capture(model, tok, PROMPTS, [Site("resid_post", 1), "resid_post.1"])
    assert list(cap.tensors) == ["resid_post.1"] and Site("resid_post", 1) in cap
    assert torch.allclose(cap[Site("resid_post", 1)], rec["resid_post.1"][torch.arange(3), batch.decision])


@torch.no_grad()
def test_stop_after_last_records_every_site_at_the_deepest_point(fam):
    """head_z and head_out of the deepest layer are read by hooks at the same point: the pass stops
    only after both are recorded, and they equal a full pass's values (either order asked)."""
    _, model, _, b = fam
    L = resolve(model).n_layers - 1
    for sites in ([f"head_z.{L}", f"head_out.{L}"], [f"head_out.{L}", f"head_z.{L}", "resid_post.0"]):
        with record(model, sites) as full:
            model(**b.model_inputs())
        with record(model, sites, stop_after_last=True) as rec:
            model(**b.model_inputs())
        assert set(rec) == set(full), sorted(rec)
        for k in sites:
            assert torch.equal(rec[k], full[k]), k
