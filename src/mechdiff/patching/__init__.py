"""The one patching engine: activation patching, mapped patching, alpha-sweeps and steering.

Everything that writes a value into a model at a site and reads the next-token distribution goes
through :class:`PatchEngine`::

    eng = PatchEngine(model, batch, measure="last", record_sites=["resid_post.3"])
    eng.clean_logits                                  # [B, V] float32
    h = eng.clean_states(["resid_post.3"])            # {"resid_post.3": [B, d]} at the decision token
    logits = eng.run([Patch("resid_post.3", h_src),   # [n_variants, B, V] float32
                      Patch("mlp_out.1", v, mode="add", alpha=2.0),
                      Patch("resid_post.2", mode="steer", basis=U, alpha=2.0),   # U: [d, k] orthonormal
                      [Patch("attn_out.2", a), Patch("mlp_out.2", m)]])   # several sites at once
    kl = patch_kl(eng, variants)                      # [n_variants, B] KL(clean || patched)
    src = chunked_clean_states(other_model, tok, prompts, ["resid_post.3"], batch_size=32)  # [N, d] sources

**What a patch does** (at the decision position ``p`` = ``batch.decision``, the last content token;
``h`` is the site's clean-run value there, ``v`` the patch value, ``U`` an orthonormal basis):

- ``replace``: ``c + alpha * (v - c)`` with centre ``c`` = ``Patch.centre`` or, by default, ``h``
  (alpha=1: ``v`` exactly; mapped patching's alpha-sweep is ``c = mu``, the tuned train mean)
- ``add``:     ``h + alpha * v``        (a fixed steering vector)
- ``steer``:   ``h + alpha * (h U) U^T`` (the state's own component in span(U) amplified)
- ``ablate``:  ``h + alpha * ((r - h) U) U^T`` (that component moved to the reference ``r`` = the
  patch value, or 0 without one: alpha=1 removes span(U); a head zeroed, or set to another model's)
- ``affine``:  ``h + alpha * ((h U) M U^T + v)`` (a linear map ``M [k, k]`` inside span(U) plus ``v``)

One formula per mode, alpha as given: a steering handle's alpha reaches the engine unchanged
(``Handle.patch``: steer -> steer, add -> add, ablate -> ablate, map -> affine).

**Measured position.** ``measure="last"`` reads the logits at the final position ``T-1`` (the next
token of the response, after the chat-template tail); ``measure="decision"`` reads them at ``p``
itself (what the seeds' journal measured).

**Exact do-nothing patches.** In bf16 a prompt run along two paths (prefix cache + suffix vs one
forward; a pass of many rows vs one of few) differs in the last bits, and KL(clean || patched) picks
that up (~1e-3 on SmolLM2, more than some real effects). The engine therefore never compares two
paths:

- *No-op detection.* For each (variant, prompt) every patch is applied to the clean run's own state
  at its site and decision token (the clean run records ``resid_pre``/``resid_post`` of every layer;
  other sites are recorded on first use by re-running the clean suffix, which reproduces it bit for
  bit). If each one gives that state back bit for bit (a written-back clean value cast to the model
  dtype, ``add`` of zeros, ``alpha=0``, no patch at all) the prompt's result *is* the clean logits:
  it is not computed, and KL is exactly 0.
- *In-pass reference.* The (variant, prompt) rows that are computed run in passes that also carry
  the clean model for each of their prompts (one reference row per prompt); a row branches off its
  reference at its start layer and runs in the same kernel calls, so up to its first patch it is
  bit for bit its reference. ``reduce`` functions that take ``ref`` (``kl_reducer``) compare with
  that reference, never with ``clean_logits``: what remains is the effect of the patch itself,
  rounding included, as in the naive path.
- *Sources from the same path.* A cross-model patch is a no-op at a layer both models share only if
  the source state is bit for bit the destination's clean state: take sources with
  :func:`chunked_clean_states` (the engine's own clean run, same chunking, measure and settings),
  not from a full forward, and do not transform them.

**Why it is fast (cache reuse).** A patch at position ``p`` changes nothing at positions ``< p``, at
any layer. Rows are grouped by ``p`` (with left padding, rows whose template tail has the same
length share it). For each group the *prefix* (positions ``< p``) runs once with a KV cache; the
clean run is that cache plus the *suffix* (``p`` .. measured position: 1 token for
``measure="decision"``, the template tail for ``"last"``). Patched rows re-run only the suffix tokens
against the prefix cache, all (variant, prompt) rows of a sweep stacked along the batch of a few
passes (``max_rows`` bounds rows per pass), each attending to its prompt's prefix (gathered per layer,
never stored). Blocks below a row's first patched layer are not recomputed (``skip_layers=True``):
a pass starts at its shallowest layer with the clean residual, and rows join at their own layer; a
``resid_post.l`` patch is applied as the input of block ``l+1``. At the ``last`` readout the final
block's output projection and MLP run on the last position only (its keys/values at the other suffix
positions are made before them), and a patch of that block after its keys/values (head_z, attn_out,
mlp_out, resid_post of the last layer) cannot reach the last position: its rows are exactly the clean
logits, not computed. No-op rows cost nothing. ``max_rows`` defaults to a share of the free GPU
memory (``mechdiff.batching.default_max_rows``): fewer passes, fewer reference rows. The prefix
cache is never mutated, so repeated calls give identical results. (The former *packed* layout, variants
side by side along the sequence under a 4D mask, is gone: identical variants at different pack
positions did not give bitwise-equal logits.)

``run_naive`` is the reference: one full forward per variant with hooks at ``p``. ``run(...,
positions="all")`` patches every position (values ``[B, T, d]`` or ``[B, d]``/``[d]`` broadcast over
positions); that changes the prefix, so it cannot reuse the cache and goes through ``run_naive``.

Shapes: ``d`` is the site width: ``d_model`` for resid/attn/mlp sites, ``H * head_dim`` for
``head_z`` (values may also be given as ``[B, H, head_dim]``; ``clean_states`` returns
``[B, H, head_dim]`` for ``head_z``).
"""
from __future__ import annotations

from mechdiff.patching.engine import MEASURES, PatchEngine
from mechdiff.patching.kl import kl_and_gap, kl_reducer, kl_to_clean, layer_sweep, patch_kl
from mechdiff.patching.measure import clean_run, patch_measure
from mechdiff.patching.sources import chunked_clean_states
from mechdiff.patching.variants import MODES, Patch, Variant

__all__ = ["MODES", "MEASURES", "Patch", "Variant", "PatchEngine", "kl_reducer", "kl_to_clean", "kl_and_gap",
           "patch_kl", "layer_sweep", "chunked_clean_states", "clean_run", "patch_measure"]
