"""What a patch is and how it edits one site's vector: the :class:`Patch` record, the patch modes
(``MODES``: one formula each, see :class:`Patch`), the arithmetic of each mode (``_apply``), site widths (``_width``), the
normalisation and validation of variants (``_prepare``) shared by the batched and naive paths of
:class:`mechdiff.patching.PatchEngine`, and no-op detection (``_noop_rows``: which prompts a variant
leaves bit for bit at the clean state). The package docstring explains the modes."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mechdiff.errors import ConfigError, NumericsError, SiteError
from mechdiff.sites.names import READ_ONLY, parse_site

MODES = ("replace", "add", "steer", "ablate", "affine")


@dataclass(frozen=True, eq=False)
class Patch:
    """One edit at one site, applied at the decision position. Each mode is one formula of the clean
    value ``h``, in which ``alpha`` enters as given (the sign and size the user chose):

    ============  ======================================  ==========================================
    mode          new value                               needs
    ============  ======================================  ==========================================
    replace       ``c + alpha (v - c)``                   value ``v``; centre ``c`` (None: ``h``)
    add           ``h + alpha v``                         value ``v``
    steer         ``h + alpha (h U) U^T``                 basis ``U``
    ablate        ``h + alpha ((r - h) U) U^T``           basis ``U``; value ``r`` (None: 0)
    affine        ``h + alpha ((h U) M U^T + v)``         basis ``U``, matrix ``M``, value ``v``
    ============  ======================================  ==========================================

    replace with alpha = 1 writes ``v``; steer amplifies the state's own component in span(U) (alpha
    = -1 removes it); ablate moves that component to the reference's (alpha = 1 with no value
    removes span(U): a subspace or a head zeroed; with ``r`` in span(U), e.g. another model's head
    slice, it writes ``r`` there exactly); affine is a linear map inside span(U) plus ``v`` (a handle
    that predicts the tuned model's component from the base's). The handles of
    :mod:`mechdiff.analyses.steering` hand their modes to the engine under the same names and alpha
    (its ``map`` as affine with ``M = A - I``).

    site: ``"resid_post.12"`` or ``("resid_post", 12)``. value / centre: ``[B, d]`` (per prompt) or
    ``[d]`` (same for every prompt). basis: ``[d, k]`` orthonormal columns. matrix: ``[k, k]``.
    """

    site: object
    value: torch.Tensor | None = None
    mode: str = "replace"
    basis: torch.Tensor | None = None
    alpha: float = 1.0
    centre: torch.Tensor | None = None
    matrix: torch.Tensor | None = None

    def resolved(self) -> torch.Tensor:
        """The value a replace patch with a centre writes, ``c + alpha * (v - c)`` (float32): it does
        not depend on the clean state, so it can be applied by a plain hook (e.g. in generation)."""
        if self.mode != "replace" or self.centre is None:
            raise ConfigError("resolved() needs a replace patch with a centre")
        c = self.centre.float()
        return c + float(self.alpha) * (self.value.float() - c)


Variant = "Patch | Sequence[Patch]"


# ---- math on one site's vectors ------------------------------------------------------------

def _apply(h: torch.Tensor, p: Patch, value: torch.Tensor | None, basis: torch.Tensor | None,
           centre: torch.Tensor | None = None) -> torch.Tensor:
    """New value of ``h`` ``[..., w]``; value (and centre) broadcast against ``h``. Math in float32.
    value / basis / centre move to ``h``'s device (a sharded model's layers live on several GPUs)."""
    a = float(p.alpha)
    dev = h.device
    value = value if value is None or value.device == dev else value.to(dev)
    basis = basis if basis is None or basis.device == dev else basis.to(dev)
    centre = centre if centre is None or centre.device == dev else centre.to(dev)
    if p.mode == "replace":
        if a == 1.0:
            return value.to(h.dtype).expand_as(h)
        c = h.float() if centre is None else centre.float()
        return (c + a * (value.float() - c)).expand_as(h).to(h.dtype)
    if p.mode == "add":
        return (h.float() + a * value.float()).to(h.dtype)
    hf = h.float()
    u = basis.float()
    if p.mode == "affine":
        m = p.matrix.to(dev).float()
        return (hf + a * (((hf @ u) @ m) @ u.T + value.float())).to(h.dtype)
    if p.mode == "steer":
        return (hf + a * ((hf @ u) @ u.T)).to(h.dtype)
    # ablate: h + alpha ((r - h) U) U^T, computed as (h - alpha (h U) U^T) + alpha (r U) U^T so that
    # alpha = 1 and r in span(U) (a head's slice) writes r's coordinates exactly
    out = (hf - a * ((hf @ u) @ u.T)).to(h.dtype)
    if value is None:
        return out
    return (out.float() + (a * (value.float() @ u)) @ u.T).to(h.dtype)


def site_edits(prepared: list, at: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
    """Hook edits ``{"name.layer": f}`` applying one prepared variant (``_prepare``'s entries for it)
    in the order given. ``at`` None: every position (values ``[B, T, w]`` as they are, ``[B, w]``
    broadcast over positions); ``(rows, cols)``: only those positions, one per row (values ``[B, w]``)."""
    by_site: dict[str, list] = {}
    for name, layer, p, value, basis, centre in prepared:
        by_site.setdefault(f"{name}.{layer}", []).append((p, value, basis, centre))

    def make(entries):
        def f(t):
            out = t.clone()
            flat = out.view(*out.shape[:2], -1)
            for p, value, basis, centre in entries:
                if at is None:
                    v = value[:, None] if value is not None and value.dim() == 2 else value
                    c = centre[:, None] if centre is not None and centre.dim() == 2 else centre
                    flat[:] = _apply(flat, p, v, basis, c)
                else:
                    r, d = at[0].to(flat.device), at[1].to(flat.device)
                    flat[r, d] = _apply(flat[r, d], p, value, basis, centre)
            return out
        return f
    return {k: make(v) for k, v in by_site.items()}


def _width(sm, name: str) -> int:
    return sm.n_heads * sm.head_dim if name == "head_z" else sm.d_model


def _prepare(sm, variants, B: int, device, positions: str = "decision"):
    """Normalise variants to ``[[(name, layer, patch, value, basis, centre), ...], ...]`` and validate."""
    if isinstance(variants, Patch):
        variants = [variants]
    out, checks = [], []
    for var in variants:
        patches = [var] if isinstance(var, Patch) else list(var)
        norm = []
        for p in patches:
            if not isinstance(p, Patch):
                raise ConfigError(f"a variant must be a Patch or a list of Patch, got {type(p).__name__}")
            name, layer = parse_site(p.site)
            sm.check(name, layer)
            if name in READ_ONLY:
                raise SiteError(f"site {name!r} is read-only; to patch single heads edit 'head_z'")
            if p.mode not in MODES:
                raise ConfigError(f"unknown patch mode {p.mode!r}; use one of {', '.join(MODES)}")
            if not torch.isfinite(torch.as_tensor(float(p.alpha))):
                raise NumericsError(f"patch alpha for {name}.{layer} is not finite ({p.alpha})")
            w = _width(sm, name)
            value = basis = centre = None
            if p.centre is not None:
                if p.mode != "replace":
                    raise ConfigError(f"a centre applies to replace patches only (got mode {p.mode!r} at "
                                      f"{name}.{layer})")
                centre = p.centre.detach()
                if centre.shape[-1] != w or centre.dim() not in (1, 2) or (centre.dim() == 2 and
                                                                         centre.shape[0] != B):
                    raise SiteError(f"patch centre for {name}.{layer} has shape {tuple(centre.shape)}; "
                                    f"expected [{B}, {w}] or [{w}]")
                checks.append((centre, f"patch centre for {name}.{layer} contains NaN/Inf"))
                centre = centre.to(device)
            if p.mode == "steer" and p.value is not None:
                raise ConfigError(f"a 'steer' patch at {name}.{layer} takes no value (it scales the state's own "
                                  "component in span(basis)); use 'add' for a fixed vector")
            if p.mode in ("replace", "add", "affine") or (p.mode == "ablate" and p.value is not None):
                if p.value is None:
                    raise ConfigError(f"a {p.mode!r} patch at {name}.{layer} needs a value")
                value = p.value.detach()
                if name == "head_z" and value.dim() >= 2 and value.shape[-2:] == (sm.n_heads, sm.head_dim):
                    value = value.reshape(*value.shape[:-2], w)
                if value.shape[-1] != w:
                    raise SiteError(
                        f"patch value width {value.shape[-1]} does not match site {name}.{layer} of this "
                        f"{sm.family} model (width {w}): the two models' widths differ, so states cannot be "
                        "patched across directly; use mapped patching (`mechdiff mapped-patch`) with a map "
                        "between the widths")
                ok_dims = (1, 2, 3) if positions == "all" else (1, 2)
                if value.dim() not in ok_dims or (value.dim() >= 2 and value.shape[0] != B):
                    raise SiteError(f"patch value for {name}.{layer} has shape {tuple(value.shape)}; expected "
                                    f"[{B}, {w}] or [{w}]" + (f" or [{B}, T, {w}]" if positions == "all" else ""))
                checks.append((value, f"patch value for {name}.{layer} contains NaN/Inf; check the source "
                                      "states or the map that produced them"))
                value = value.to(device)
            if p.mode in ("steer", "ablate", "affine"):
                if p.basis is None or p.basis.dim() != 2 or p.basis.shape[0] != w:
                    raise SiteError(f"{p.mode} at {name}.{layer} needs a basis of shape [{w}, k], got "
                                    f"{None if p.basis is None else tuple(p.basis.shape)}")
                k = p.basis.shape[1]
                if p.mode == "affine" and (p.matrix is None or tuple(p.matrix.shape) != (k, k)):
                    raise SiteError(f"affine at {name}.{layer} needs a matrix of shape [{k}, {k}], got "
                                    f"{None if p.matrix is None else tuple(p.matrix.shape)}")
                checks.append((p.basis, f"{p.mode} basis for {name}.{layer} contains NaN/Inf"))
                basis = p.basis.detach().to(device)
            norm.append((name, layer, p, value, basis, centre))
        out.append(norm)
    _check_finite(checks)
    return out


def _check_finite(checks: list) -> None:
    """Raise NumericsError with the message of the first ``(tensor, message)`` whose tensor is not all
    finite; one device-to-host read per device, not one per tensor."""
    by_dev: dict = {}
    for i, (t, _) in enumerate(checks):
        by_dev.setdefault(t.device, []).append(i)
    bad = []
    for idx in by_dev.values():
        ok = torch.stack([torch.isfinite(checks[i][0]).all() for i in idx]).cpu()
        bad += [i for i, o in zip(idx, ok.tolist()) if not o]
    if bad:
        raise NumericsError(checks[min(bad)][1])


# ---- no-op detection ---------------------------------------------------------------------------

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns of ``t`` (so that -0.0 != 0.0 and the comparison is bitwise)."""
    return t.view(_INT[t.element_size()])


def _noop_rows(prepared, clean: dict, B: int) -> torch.Tensor:
    """``[n_variants, B]`` bool: True where every patch of the variant, applied by :func:`_apply` to
    the clean state at its site (``clean["name.layer"]``: ``[B, w]`` in the model's dtype, at the
    decision position), gives back that state bit for bit. Such a prompt's run *is* the clean run
    (each patch sees the clean value, because every earlier one changed nothing), so its result is
    the clean logits exactly and need not be computed."""
    out = torch.ones(len(prepared), B, dtype=torch.bool)
    found, rows = [], []
    for v, var in enumerate(prepared):
        ok = None
        for name, layer, p, value, basis, centre in var:
            h = clean[f"{name}.{layer}"]
            same = (_bits(_apply(h, p, value, basis, centre)) == _bits(h)).all(-1)
            ok = same if ok is None else ok & same.to(ok.device)
        if ok is not None:
            found.append(v)
            rows.append(ok.to(rows[0].device) if rows else ok)
    if found:
        out[found] = torch.stack(rows).cpu()     # one device-to-host read
    return out
