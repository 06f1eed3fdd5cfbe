"""Attribution, path patching and head math on tiny random models (known answers, float64)."""
import math

import pytest
import torch

from mechdiff.analyses import heads as hm
from mechdiff.analyses.attribution import Target, grad_x_act, integrated_gradients
from mechdiff.analyses.path_patching import first_hops, path_patch
from mechdiff.data.prompts import encode
from mechdiff.errors import ConfigError
from mechdiff.models.tiny import tiny_model
from mechdiff.patching import Patch, PatchEngine
from mechdiff.sites.capture import capture

PROMPTS = ["What is the capital of France?", "hi there", "Tell me a short story about a dragon", "2+2="]
H, HD = 4, 16


@pytest.fixture(scope="module")
def llama():
    model, tok = tiny_model("llama", n_layers=4)
    return model.double(), tok


def _head(h, width=H * HD):
    u = torch.zeros(width, HD, dtype=torch.float64)
    u[h * HD:(h + 1) * HD] = torch.eye(HD)
    return u


def _engine_target(model, tok, measure):
    eng = PatchEngine(model, encode(tok, PROMPTS), measure=measure)
    return eng, Target(eng.clean_logits.argmax(-1))


@pytest.mark.parametrize("measure", ["decision", "last"])
def test_grad_x_act_is_the_first_order_ablation_effect(llama, measure):
    """grad . z of head h = d/d(eps) of target(z with head h scaled by 1 - eps) (central differences
    through the patching engine)."""
    model, tok = llama
    eng, tgt = _engine_target(model, tok, measure)
    layers = [1, 3]
    r = grad_x_act(model, tok, PROMPTS, tgt, layers, measure=measure, batch_size=3)
    assert r["attr"].shape == (len(PROMPTS), 2, H)
    assert torch.allclose(r["score"].float(), tgt.score(eng.clean_logits, torch.arange(len(PROMPTS))))
    eps = 1e-2
    for j, l in enumerate(layers):
        var = [Patch(f"head_z.{l}", mode="ablate", basis=_head(h), alpha=a) for h in range(H) for a in (eps, -eps)]
        s = eng.run(var, reduce=lambda lg, rows: tgt.score(lg, rows))          # [2H, N]
        fd = ((s[1::2] - s[0::2]) / (2 * eps)).double()                        # [H, N]
        assert torch.allclose(fd.T, r["attr"][:, j], atol=1e-4 + 1e-3 * fd.abs().max()), (l, fd.T, r["attr"][:, j])
    assert r["attr"][:, 0].abs().max() > 1e-3                                  # gradients flow


def test_integrated_gradients_complete_to_the_layer_ablation(llama):
    """IG over a layer's heads (zero baseline) sums to target(clean) - target(all heads zeroed)."""
    model, tok = llama
    eng, tgt = _engine_target(model, tok, "decision")
    ig = integrated_gradients(model, tok, PROMPTS, tgt, [2], steps=16)
    zeroed = eng.run([Patch("head_z.2", mode="ablate", basis=torch.eye(H * HD, dtype=torch.float64))],
                     reduce=lambda lg, rows: tgt.score(lg, rows))[0]
    full = ig["score"] - zeroed.double()
    assert full.abs().max() > 1e-2
    assert torch.allclose(ig["attr"][:, 0].sum(-1), full, atol=2e-3 * full.abs().max())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_ablating_all_heads_equals_removing_attention_output(family):
    model, tok = tiny_model(family, n_layers=2)
    eng = PatchEngine(model, encode(tok, PROMPTS[:3]), measure="decision")
    sm = eng.sm
    w = sm.n_heads * sm.head_dim
    heads = eng.run([Patch("head_z.1", mode="ablate", basis=torch.eye(w))])
    removed = eng.run([Patch("attn_out.1", torch.zeros(sm.d_model))])
    assert (heads - eng.clean_logits).abs().max() > 1e-3
    assert torch.allclose(heads, removed, atol=1e-4)


def test_only_requested_layers_keep_a_graph(llama):
    """Nothing below the first requested layer records autograd history; the model's parameters keep
    their requires_grad flags."""
    model, tok = llama
    model.lm_head.weight.requires_grad_(True)
    flags = {}
    hooks = [blk.register_forward_hook(lambda m, a, o, i=i: flags.__setitem__(i, o[0].requires_grad if
                                                                           isinstance(o, tuple) else o.requires_grad))
             for i, blk in enumerate(model.model.layers)]
    try:
        grad_x_act(model, tok, PROMPTS[:2], Target(torch.tensor([5, 6])), [2])
    finally:
        for h in hooks:
            h.remove()
    assert flags == {0: False, 1: False, 2: True, 3: True}
    assert model.lm_head.weight.requires_grad and model.lm_head.weight.grad is None


def test_target_kinds_and_checks():
    logits = torch.tensor([[0.0, 1.0, 2.0], [2.0, 0.0, 0.0]])
    lp = torch.log_softmax(logits, -1)
    t = Target(torch.tensor([2, 0]))
    assert torch.allclose(t.score(logits, torch.arange(2)), lp[[0, 1], [2, 0]])
    masked = Target(torch.tensor([2, 0]), allowed_ids=torch.tensor([0, 2]))
    assert torch.allclose(masked.score(logits, torch.arange(2))[0], torch.log_softmax(torch.tensor([0.0, 2.0]), -1)[1])
    ref = Target(torch.tensor([[1, 2], [1, 2]]), kind="refusal")
    assert ref.unit == "points" and torch.allclose(ref.score(logits, torch.arange(2)),
                                                   100 * torch.sigmoid(lp[:, 1] - lp[:, 2]))
    with pytest.raises(ConfigError):
        Target(torch.tensor([1, 2]), kind="refusal")
    with pytest.raises(ConfigError):
        Target(torch.tensor([1]), kind="vibes")


def test_path_patching_decomposes_the_total_effect(llama):
    """In the linear regime (head scaled by 1 - 1e-3) the path effects over all first hops sum to the
    total effect; the direct path to the logits equals final_norm(resid + W_O^h dz) read by hand."""
    model, tok = llama
    eng, tgt = _engine_target(model, tok, "decision")
    z = capture(model, tok, PROMPTS, ["head_z.1"], dtype_out=torch.float64)["head_z.1"]
    h = 2
    parts = [path_patch(model, tok, PROMPTS, tgt, 1, h, r, value=z[:, h] * (1 - 1e-3)) for r in first_hops(1, 4)]
    total = parts[0]["total"]
    assert total.abs().max() > 1e-5
    assert torch.allclose(sum(p["path"] for p in parts), total, atol=0.02 * total.abs().max())
    direct = path_patch(model, tok, PROMPTS, tgt, 1, h, "logits")["path"]          # zero ablation
    from mechdiff.sites.hooks import record
    b = encode(tok, PROMPTS)
    with torch.no_grad(), record(model, ["resid_post.3"]) as rec:
        model(**b.model_inputs())
    w = model.model.layers[1].self_attn.o_proj.weight[:, h * HD:(h + 1) * HD]
    rows = torch.arange(len(PROMPTS))
    resid = rec["resid_post.3"][rows, b.decision] - z[:, h] @ w.T
    by_hand = tgt.score(eng.clean_logits, rows) - tgt.score(model.lm_head(model.model.norm(resid)), rows)
    assert torch.allclose(direct, by_hand, atol=1e-6)
    with pytest.raises(ConfigError, match="not downstream"):
        path_patch(model, tok, PROMPTS, tgt, 2, 0, "attn_out.1")


# ---- pure head math ------------------------------------------------------------------------

def test_importance_churn_overlap():
    s = torch.tensor([[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 3.0], [0.0] * 9])
    assert hm.important(s).tolist() == [[False] * 8 + [True], [False] * 9]          # z = 2.83; flat layer: none
    assert hm.important(s, abs_threshold=0.05, floor=0.05)[0].all()
    t = s.clone()
    t[1, 4] = 5.0
    assert hm.churn(hm.important(s), hm.important(t)) == pytest.approx(1 / 18)
    assert hm.topk(s, [10, 11], 1) == [(10, 8)] and hm.jaccard([(1, 2)], [(1, 2), (3, 4)]) == 0.5
    cmp = hm.compare(s, s, [10, 11], k=3)
    assert cmp["churn"] == 0 and cmp["topk_jaccard"] == 1 and cmp["spearman"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g)
    assert hm.spearman(x, x ** 3) == pytest.approx(1.0) and hm.spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(hm.spearman(torch.ones(2, 3), x[:2, :3]))


def test_overlap_chance_is_hypergeometric():
    c = hm.overlap_chance(270, 60, 60, observed=0)
    assert c["expected"] == pytest.approx(60 * 60 / 270) and c["p_value"] == pytest.approx(1.0)
    g = torch.Generator().manual_seed(1)
    draws = [len(set(torch.randperm(30, generator=g)[:6].tolist()) & set(range(9))) for _ in range(4000)]
    c = hm.overlap_chance(30, 9, 6, observed=4)
    assert sum(draws) / len(draws) == pytest.approx(c["expected"], abs=0.05)
    assert sum(d >= 4 for d in draws) / len(draws) == pytest.approx(c["p_value"], abs=0.01)
    score = torch.tensor([[5.0, 4.0, 0.0], [0.0, 0.0, 3.0]])
    rec = hm.recovery(score, [7, 8], [(7, 0), (8, 2), (9, 1)])              # (9, 1): not analysed
    assert (rec["observed"], rec["k"], rec["planted"]) == (1, 2, [[7, 0], [8, 2]])
    assert hm.recovery(score, [7, 8], [(7, 0), (8, 2)], k=3)["observed"] == 2


def test_grad_x_act_left_padding_bf16_survives_cudnn_style_sdpa(monkeypatch):
    """Regression (bench_rq4 on an H200, bf16): torch picked the cuDNN SDPA kernel, whose backward is
    NaN on fully masked query rows (left-padded pad positions); the NaN reached every key/value
    gradient of the prompt, so every head of every padded prompt was NaN. The kernel is emulated on
    CPU while cuDNN SDPA is enabled: the attribution pass must not use it (finite, same as math)."""
    import torch.nn.functional as F
    real = F.scaled_dot_product_attention

    def cudnn_like(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
        if not torch.backends.cuda.cudnn_sdp_enabled():
            return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale,
                        enable_gqa=enable_gqa)
        if enable_gqa and k.shape[-3] != q.shape[-3]:
            k = k.repeat_interleave(q.shape[-3] // k.shape[-3], -3)
            v = v.repeat_interleave(q.shape[-3] // v.shape[-3], -3)
        s = (q.float() @ k.float().transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
        if attn_mask is not None:
            s = s.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else s + attn_mask
        if is_causal:
            s = s.masked_fill(torch.ones_like(s, dtype=torch.bool).triu(1), float("-inf"))
        p = torch.softmax(s, -1)                       # NaN on a fully masked row (as cuDNN's backward)
        out = (p.nan_to_num(0.0) @ v.float()).to(q.dtype)        # forward output stays finite
        return out + (p @ v.float() - (p @ v.float()).detach()).to(q.dtype)  # the NaN only in backward

    model, tok = tiny_model("llama", n_layers=3, dtype=torch.bfloat16)
    prompts = ["hi", "Tell me a short story about a dragon and a knight", "2+2=", "What is the capital of France?"]
    allowed = torch.arange(0, len(tok), 2)
    tgt = Target(torch.full((len(prompts),), 2), allowed_ids=allowed)
    ref = grad_x_act(model, tok, prompts, tgt, [0, 2], batch_size=4)
    assert encode(tok, prompts).attention_mask.eq(0).any()                  # left padding in the batch
    monkeypatch.setattr(F, "scaled_dot_product_attention", cudnn_like)
    torch.backends.cuda.enable_cudnn_sdp(True)
    r = grad_x_act(model, tok, prompts, tgt, [0, 2], batch_size=4)
    assert torch.isfinite(r["attr"]).all(), r["attr"]
    assert torch.equal(r["attr"], ref["attr"]) and r["attr"].abs().max() > 0
