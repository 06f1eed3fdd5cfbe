"""The one patching engine: activation patching, mapped patching, alpha-sweeps and steering.

Everything that writes a value into a model at a site and reads the next-token distribution goes
through :class:`PatchEngine`::

    eng = PatchEngine(model, batch, measure="last", record_sites=["resid_post.3"])
    eng.clean_logits                                  # [B, V] float32
    h = eng.clean_states(["resid_post.3"])            # {"resid_post.3": [B, d]} at the decision token
    logits = eng.run([Patch("resid_post.3", h_src),   # [n_variants, B, V] float32
                      Patch("mlp_out.1", v, mode="add", alpha=2.0),
                      [Patch("attn_out.2", a), Patch("mlp_out.2", m)]])   # several sites at once
    kl = patch_kl(eng, variants)                      # [n_variants, B] KL(clean || patched)

**What a patch does** (at the decision position ``p`` = ``batch.decision``, the last content token;
``h`` is the site's clean-run value there, ``v`` the patch value, ``U`` an orthonormal basis):

- ``replace``:     ``h + alpha * (v - h)``  (alpha=1: ``v`` exactly; mapped patching's alpha-sweep)
- ``add``:         ``h + alpha * v``        (steering)
- ``project_out``: ``h - alpha * (h U) U^T`` (ablation of a subspace)

**Measured position.** ``measure="last"`` reads the logits at the final position ``T-1`` (the next
token of the response, after the chat-template tail); ``measure="decision"`` reads them at ``p``
itself (what the seeds' journal measured).

**Why it is fast (cache reuse).** A patch at position ``p`` changes nothing at positions ``< p``, at
any layer. Rows are grouped by ``p`` (with left padding, rows whose template tail has the same
length share it). For each group the *prefix* (positions ``< p``) runs once with a KV cache; the
clean run is that cache plus the *suffix* (``p`` .. measured position: 1 token for
``measure="decision"``, the template tail for ``"last"``). A patched variant re-runs only the suffix
tokens against the prefix cache, and many variants (layers x alphas x sites ...) are stacked along
the batch dimension of one pass (``max_rows`` bounds rows per pass). Layers below the shallowest
patched layer of a pass are not recomputed either: they are swapped for an identity for the
duration of the pass and the clean suffix residual is written back at the first computed layer
(``skip_layers=True``). The prefix cache is copied per pass (shallow copies of HF's cache layers
whose tensors are replaced, never mutated), so repeated calls give identical results.

``run_naive`` is the reference: one full forward per variant with hooks at ``p``. ``run(...,
positions="all")`` patches every position (values ``[B, T, d]`` or ``[B, d]``/``[d]`` broadcast over
positions); that changes the prefix, so it cannot reuse the cache and goes through ``run_naive``.

Shapes: ``d`` is the site width: ``d_model`` for resid/attn/mlp sites, ``H * head_dim`` for
``head_z`` (values may also be given as ``[B, H, head_dim]``; ``clean_states`` returns
``[B, H, head_dim]`` for ``head_z``).
"""
from __future__ import annotations

from mechdiff.patching.engine import MEASURES, PatchEngine
from mechdiff.patching.kl import _kl as _kl
from mechdiff.patching.kl import kl_reducer, layer_sweep, patch_kl
from mechdiff.patching.variants import MODES, Patch, Variant

__all__ = ["MODES", "MEASURES", "Patch", "Variant", "PatchEngine", "kl_reducer", "patch_kl", "layer_sweep"]
