"""What a patch is and how it edits one site's vector: the :class:`Patch` record, the patch modes
(``MODES``), the arithmetic of each mode (``_apply``), site widths (``_width``) and the
normalisation and validation of variants (``_prepare``) shared by the batched and naive paths of
:class:`mechdiff.patching.PatchEngine` (the package docstring explains the modes)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mechdiff.errors import ConfigError, NumericsError, SiteError
from mechdiff.sites.names import READ_ONLY, parse_site

MODES = ("replace", "add", "project_out")


@dataclass(frozen=True, eq=False)
class Patch:
    """One edit at one site, applied at the decision position.

    site: ``"resid_post.12"`` or ``("resid_post", 12)``. value: ``[B, d]`` (per prompt) or ``[d]``
    (same for every prompt); required for replace/add. basis: ``[d, k]`` orthonormal columns for
    project_out. alpha: scale (see the ``mechdiff.patching`` package docstring).
    """

    site: object
    value: torch.Tensor | None = None
    mode: str = "replace"
    basis: torch.Tensor | None = None
    alpha: float = 1.0


Variant = "Patch | Sequence[Patch]"


# ---- math on one site's vectors ------------------------------------------------------------

def _apply(h: torch.Tensor, p: Patch, value: torch.Tensor | None, basis: torch.Tensor | None) -> torch.Tensor:
    """New value of ``h`` ``[..., w]``; value broadcasts against ``h``. Math in float32."""
    a = float(p.alpha)
    if p.mode == "replace":
        if a == 1.0:
            return value.to(h.dtype).expand_as(h)
        hf = h.float()
        return (hf + a * (value.float() - hf)).to(h.dtype)
    if p.mode == "add":
        return (h.float() + a * value.float()).to(h.dtype)
    hf = h.float()
    u = basis.float()
    return (hf - a * ((hf @ u) @ u.T)).to(h.dtype)


def _width(sm, name: str) -> int:
    return sm.n_heads * sm.head_dim if name == "head_z" else sm.d_model


def _prepare(sm, variants, B: int, device, positions: str = "decision"):
    """Normalise variants to ``[[(name, layer, patch, value, basis), ...], ...]`` and validate."""
    if isinstance(variants, Patch):
        variants = [variants]
    out = []
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
            value = basis = None
            if p.mode in ("replace", "add"):
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
                if not torch.isfinite(value).all():
                    raise NumericsError(f"patch value for {name}.{layer} contains NaN/Inf; check the source "
                                        "states or the map that produced them")
                value = value.to(device)
            else:
                if p.basis is None or p.basis.dim() != 2 or p.basis.shape[0] != w:
                    raise SiteError(f"project_out at {name}.{layer} needs a basis of shape [{w}, k], got "
                                    f"{None if p.basis is None else tuple(p.basis.shape)}")
                if not torch.isfinite(p.basis).all():
                    raise NumericsError(f"project_out basis for {name}.{layer} contains NaN/Inf")
                basis = p.basis.detach().to(device)
            norm.append((name, layer, p, value, basis))
        out.append(norm)
    return out
