"""Known answers for the steering math (analyses.steering), the Handle artifact and the readouts under
patches (analyses.readouts), on synthetic data and tiny random models (fast)."""
from __future__ import annotations

import math

import pytest
import torch

from mechdiff.analyses import readouts as R
from mechdiff.analyses import steering as S
from mechdiff.errors import ConfigError, NumericsError
from mechdiff.models.tiny import tiny_model


def _orth(d, k, seed):
    return torch.linalg.qr(torch.randn(d, k, generator=torch.Generator().manual_seed(seed)))[0]


def _span_err(U, W):
    """Largest distance of a column of W from span(U) (both orthonormal)."""
    return float((W - U @ (U.T @ W)).norm(dim=0).max())


def test_project_out_removes_and_project_in_adds_variance_along_u():
    g = torch.Generator().manual_seed(0)
    H = torch.randn(400, 16, generator=g) * torch.linspace(0.5, 2.0, 16)
    U = _orth(16, 3, 1)
    out, inn = S.project_out(H, U), S.project_in(H, U, alpha=1.0)
    var_u = lambda X: float((X @ U).var(0).sum())            # noqa: E731
    var_perp = lambda X: float((X - X @ U @ U.T).var(0).sum())  # noqa: E731
    assert var_u(out) < 1e-9 * var_u(H)
    assert var_u(inn) == pytest.approx(4.0 * var_u(H), rel=1e-5)     # (1 + alpha)^2
    assert var_perp(out) == pytest.approx(var_perp(H), rel=1e-5)
    assert var_perp(inn) == pytest.approx(var_perp(H), rel=1e-5)
    assert torch.allclose(S.project_out(H, U, alpha=0.5), S.project_in(H, U, alpha=-0.5))


def test_difference_in_means_and_rank_k_basis_recover_a_planted_subspace():
    g = torch.Generator().manual_seed(2)
    d, W = 32, _orth(32, 2, 3)
    B = torch.randn(2000, d, generator=g)
    coef = torch.randn(2000, 2, generator=g) * torch.tensor([3.0, 3.0]) + torch.tensor([6.0, 0.0])
    A = torch.randn(2000, d, generator=g) + coef @ W.T
    u = S.difference_in_means(A, B)
    assert abs(float(u @ W[:, 0])) > 0.99 and float(u.norm()) == pytest.approx(1.0, abs=1e-6)
    U3 = S.contrast_basis(A, B, 3)
    assert torch.allclose(U3[:, 0], u, atol=1e-5)                   # mean difference first
    assert torch.allclose(U3.T @ U3, torch.eye(3), atol=1e-5)
    assert _span_err(U3[:, :2], W) < 0.1                             # k = 2 spans the planted plane
    assert torch.allclose(S.contrast_basis(A, B, 2), U3[:, :2], atol=1e-5)   # nested in k
    base = torch.randn(100, d, generator=g)
    tuned = base + (torch.randn(100, 2, generator=g) + 1.0) @ W.T
    D = S.diff_basis(tuned, base, 2)
    assert _span_err(D, W) < 1e-4                                    # exact: the difference lives in span(W)
    with pytest.raises(NumericsError, match="no direction|do not differ"):
        S.diff_basis(base, base, 1)                                  # a model against itself
    with pytest.raises(NumericsError, match="k <= 2"):
        S.diff_basis(tuned, base, 4)                                 # a rank-2 difference has no 4th direction
    with pytest.raises(ConfigError, match="widths"):
        S.diff_basis(tuned[:, :8], base, 1)


def test_random_basis_is_seeded_orthonormal_and_nested():
    R8 = S.random_basis(20, 8, seed=4)
    assert torch.allclose(R8.T @ R8, torch.eye(8), atol=1e-5)
    assert torch.equal(R8, S.random_basis(20, 8, seed=4)) and not torch.equal(R8, S.random_basis(20, 8, seed=5))
    assert torch.allclose(S.random_basis(20, 3, seed=4), R8[:, :3], atol=1e-5)


def test_handle_round_trips_and_applies_in_two_lines(tmp_path):
    from mechdiff.data.prompts import encode
    from mechdiff.patching import PatchEngine
    model, tok = tiny_model("llama", seed=1)
    U = _orth(64, 2, 6)
    h = S.Handle(2, "resid_post", U, mode="ablate", alpha=1.0, provenance={"note": "synthetic"})
    h.save(tmp_path / "h")
    loaded = S.Handle.load(tmp_path / "h")
    assert torch.equal(loaded.basis, h.basis) and loaded.mode == "ablate" and loaded.provenance == {"note": "synthetic"}
    batch = encode(tok, ["hello there", "what is kumis?"])
    clean = model(**batch.model_inputs()).logits
    with S.Handle.load(tmp_path / "h").apply(model):                 # the two lines
        steered = model(**batch.model_inputs()).logits
    assert not torch.allclose(clean, steered, atol=1e-4)
    assert torch.equal(model(**batch.model_inputs()).logits, clean)  # hooks removed after the block
    # the engine's patch for the same handle gives the same logits (all positions, naive path)
    eng = PatchEngine(model, batch, measure="last")
    extra = {"reference": torch.randn(64), "matrix": torch.randn(2, 2), "offset": torch.randn(2)}
    for mode, alpha, kw in (("ablate", 1.0, {}), ("steer", 2.0, {}), ("add", 0.5, {}),
                            ("ablate", 0.5, {"reference": extra["reference"]}),
                            ("map", 0.7, {"matrix": extra["matrix"], "offset": extra["offset"]})):
        hh = S.Handle(2, "resid_post", U, mode=mode, alpha=alpha, scale=3.0, **kw)
        with hh.apply(model):
            ref = model(**batch.model_inputs()).logits[:, -1]
        got = eng.run([hh.patch()], positions="all")[0]
        assert torch.allclose(got, ref, atol=1e-4), mode
        with hh.apply(model, batch.decision):                         # the decision token only
            ref = model(**batch.model_inputs()).logits[:, -1]
        assert torch.allclose(eng.run([hh.patch()])[0], ref, atol=1e-4), mode   # the engine's cached path
    h.reference, h.matrix, h.offset = extra["reference"], extra["matrix"], extra["offset"]
    h.save(tmp_path / "h2")
    back = S.Handle.load(tmp_path / "h2", mode="map")
    assert torch.equal(back.matrix, h.matrix) and torch.equal(back.reference, h.reference)
    with pytest.raises(NumericsError, match="orthonormal"):
        S.Handle(2, "resid_post", U * 2.0)
    with pytest.raises(ConfigError, match="reflect"):
        S.Handle(2, "resid_post", U, mode="ablate", alpha=2.0)          # alpha > 1 is a reflection
    with pytest.raises(ConfigError, match="map handle"):
        S.Handle(2, "resid_post", U, mode="map")
    with pytest.raises(ConfigError, match="mode"):
        S.Handle(2, "resid_post", U, mode="zap")


def test_logit_lens_reads_an_unembedding_direction():
    model, tok = tiny_model("llama", seed=2)
    W = model.get_output_embeddings().weight.detach()
    t = 100
    u = (W[t] / W[t].norm())[:, None]
    (lens,) = S.logit_lens(model, tok, torch.cat([u], 1), top=3)
    assert lens["promoted"][0] == tok.decode([t])
    (neg,) = S.logit_lens(model, tok, -u, top=3)
    assert neg["suppressed"][0] == tok.decode([t])


def test_readouts_known_answers():
    from mechdiff.analyses.behaviour.mc import mc_prompt, mc_scores
    from mechdiff.data.prompts import encode
    from mechdiff.models.load import LoadedModel
    from mechdiff.pairs.spec import ModelSpec
    from mechdiff.patching import Patch, PatchEngine
    model, tok = tiny_model("llama", seed=3)
    side = LoadedModel(model=model, tokenizer=tok, spec=ModelSpec(kind="local", path="/tiny"), info={})
    assert R.perplexity_change_pct(torch.tensor([0.0, 0.0])) == 0.0
    assert R.perplexity_change_pct(torch.tensor([math.log(1.05)] * 3)) == pytest.approx(5.0)
    items = [{"id": f"q{i}", "question": q, "choices": ["1", "2", "3"], "answer": i % 3}
             for i, q in enumerate(["one?", "two?", "three?", "four?"])]
    neutral = ["hello there", "the weather is", "a cat sat"]
    U = _orth(64, 2, 7)
    nothing = Patch("resid_post.1", mode="ablate", basis=U, alpha=0.0)
    big = Patch("resid_post.1", torch.full((64,), 30.0), mode="add")
    rows = R.side_effects(side, neutral, items, [nothing, big], None, batch_size=2, also="decision")
    assert rows[0]["ppl_change_pct_unmasked"] == pytest.approx(0.0, abs=1e-3)
    assert rows[0]["ppl_change_pct_unmasked_at_decision"] == pytest.approx(0.0, abs=1e-3)
    assert rows[0]["mc_drop_pp_unmasked"] == 0.0
    # a variant that changes nothing: exactly zero side effects (the clean side is the in-pass reference)
    assert all(rows[0][f"{k}_{m}"] == 0.0 for k in ("ppl_change_pct", "mc_drop_pp", "mc_dlogp_drop")
               for m in ("masked", "unmasked"))
    assert rows[1]["ppl_change_pct_unmasked_at_decision"] > 1.0
    # the clean MC accuracy is the one MC scorer's on the engine's clean logits
    eng = PatchEngine(model, encode(tok, [mc_prompt(it) for it in items]), measure="last")
    assert rows[0]["mc_acc_clean_unmasked"] == mc_scores(eng.clean_logits, items, tok)["accuracy"]
    assert R.within(rows[0], 5.0, 5.0)
    ok = {"ppl_change_pct_masked": 4.9, "ppl_change_pct_unmasked": 1.0, "mc_drop_pp_masked": 0.0}
    assert R.within(ok, 5.0, 5.0) and not R.within({**ok, "ppl_change_pct_unmasked": 5.1}, 5.0, 5.0)
    assert not R.within({**ok, "mc_drop_pp_unmasked": 12.5}, 5.0, 5.0)
    assert not R.within({**ok, "ppl_change_pct_masked": float("nan")}, 5.0, 5.0)
    assert not R.within({"k": 1}, 5.0, 5.0)                # nothing measured: no evidence, not "within"


def test_handles_mean_what_they_say():
    """Ablation moves the subspace component to the other model's (never reflects); an exactly
    rank-2 difference gives a 2-column basis when asked for 4 (at_most); the map handle reproduces an
    input-dependent change inside the subspace, which steer (a scaled own component) cannot."""
    g = torch.Generator().manual_seed(3)
    d, N = 32, 200
    W = _orth(d, 2, 4)
    base = torch.randn(N, d, generator=g)
    B = torch.tensor([[0.5, -1.2], [0.8, 0.3]])
    tuned = base + ((base @ W) @ B) @ W.T + 0.7 * W[:, 0]          # an input-dependent rank-2 change
    U = S.diff_basis(tuned, base, 4, at_most=True)
    assert U.shape == (d, 2) and _span_err(U, W) < 1e-4
    assert torch.allclose(S.ablate_toward(tuned, U, base, 1.0), base, atol=1e-4)     # the whole difference
    half = S.ablate_toward(tuned, U, base, 0.5)
    assert torch.allclose(half, (tuned + base) / 2, atol=1e-4)
    A, c = S.fit_map(U, tuned[:150], base[:150])
    pred = S.map_step(base[150:], U, A, c, 1.0)
    assert float((pred - tuned[150:]).norm() / (tuned[150:] - base[150:]).norm()) < 1e-3
    best_steer = min(float((S.project_in(base[150:], U, a) - tuned[150:]).norm()) for a in torch.linspace(-3, 3, 61))
    assert best_steer > 0.5 * float((tuned[150:] - base[150:]).norm())
