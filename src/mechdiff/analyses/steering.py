"""Rank-k steering and ablation handles: the math (directions, bases, projections, logit lens) and
the :class:`Handle` artifact.

Shapes: activations ``H`` are ``[N, d]`` (one position per prompt) or ``[..., d]``; a basis ``U`` is
``[d, k]`` with orthonormal columns (``U^T U = I_k``). Bases are built in float64, returned float32.

Directions:

- :func:`difference_in_means` ``(A [Na, d], B [Nb, d]) -> [d]``: unit ``mean(A) - mean(B)``.
- :func:`orthonormal_around` ``(D [N, d], first [d], k) -> [d, k]``: ``first`` (normalised) as the first
  column, then the top right singular vectors of ``D`` with ``first`` projected out. Because the mean
  of the difference data points along ``first``, projecting it out also centres the data, so this is
  the SVD of the centred difference data orthogonalised against the mean-difference direction.
- :func:`contrast_basis` (labelled: aligned ``A`` vs neutral ``B`` states, ``D = A - mean(B)``),
  :func:`diff_basis` (no labels: the same prompts through both models, ``D = tuned - base``; both in
  one width, so for models of different widths build contrast bases in the tuned model's space) and
  :func:`random_basis` (a seeded orthonormal control of the same k).

Interventions on one state ``h`` (what :meth:`Handle.apply` hooks in and :meth:`Handle.patch` hands
to the patching engine):

- ``steer``:  ``h + alpha (h U) U^T``      (:func:`project_in`: amplify the state's own component)
- ``add``:    ``h + alpha s u``             (``u`` = the first column, the mean-difference direction;
  ``s`` = the handle's ``scale``, the mean ``||h||`` at the site on the fit prompts: a fixed vector, so
  the sweep and the deployed handle add exactly the same thing)
- ``ablate``: ``h + alpha ((r - h) U) U^T`` (:func:`ablate_toward`; alpha in [0, 1]): the component in
  span(U) moved to the reference's, ``r`` = the other model's state on this input (the sweep) or the
  handle's ``reference`` (the other model's mean state at the site on the fit prompts; a deployed
  handle). alpha = 1 with a basis spanning the whole difference gives the other model's state; it
  never reflects (alpha > 1 is refused). Without a reference, ``r = 0`` (the span projected out).
- ``map``:    ``h + alpha ((h U)(A - I) + c) U^T`` (:func:`map_step`): the component in span(U) replaced
  by the tuned model's as predicted from the base's by the affine map ``U^T h_t ~ A^T U^T h_b + c``
  (:func:`fit_map`, least squares on the fit prompts): reproduces an input-dependent change inside
  the subspace, which ``steer`` (a scaled copy of the base's own component) and ``add`` (one fixed
  vector) cannot.

A difference of exactly rank r < k has only r directions: :func:`diff_basis` with ``at_most=True``
returns those r (the caller reports the layer as exactly rank r and analyses k <= r).
"""
from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from mechdiff.errors import ConfigError, DataError, NumericsError, SiteError

MODES = ("steer", "add", "ablate", "map")
FORMAT = "mechdiff.handle"
VERSION = 1


# ---------------------------------------------------------------------------------------- math
def _rows(X: torch.Tensor, name: str) -> torch.Tensor:
    if X.dim() != 2 or X.shape[0] < 1:
        raise DataError(f"{name} must be [N, d] with N >= 1, got shape {tuple(X.shape)}")
    if not torch.isfinite(X).all():
        raise NumericsError(f"{name} contains NaN/Inf")
    return X.double()


def _unit(v: torch.Tensor, what: str) -> torch.Tensor:
    n = float(v.norm())
    if not n > 1e-12 * max(1.0, float(v.abs().max())) or not math.isfinite(n):
        raise NumericsError(f"{what} is zero: the two activation sets do not differ on average, so there "
                            "is no direction to steer along")
    return v / n


def difference_in_means(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Unit vector ``(mean(A) - mean(B)) / ||.||``: ``[d]`` float32 from ``A [Na, d]``, ``B [Nb, d]``."""
    A, B = _rows(A, "A"), _rows(B, "B")
    if A.shape[1] != B.shape[1]:
        raise DataError(f"A and B have different widths ({A.shape[1]} vs {B.shape[1]})")
    return _unit(A.mean(0) - B.mean(0), "mean(A) - mean(B)").float()


def orthonormal_around(D: torch.Tensor, first: torch.Tensor, k: int, at_most: bool = False) -> torch.Tensor:
    """``[d, k]`` orthonormal basis: column 0 = ``first / ||first||``, columns 1.. = the top ``k - 1``
    right singular vectors of ``D [N, d]`` after projecting ``first`` out of its rows.

    When fewer than ``k - 1`` directions carry variance (too few rows, or data that lives in fewer
    dimensions): NumericsError, or with ``at_most`` the ``r + 1 < k`` columns there are."""
    D = _rows(D, "difference data")
    if k < 1 or k > D.shape[1]:
        raise ConfigError(f"k must be in 1..{D.shape[1]} (the width), got {k}")
    u = _unit(first.double().flatten(), "the first direction")
    if u.numel() != D.shape[1]:
        raise DataError(f"first direction has width {u.numel()}, data has {D.shape[1]}")
    if k == 1:
        return u[:, None].float()
    R = D - (D @ u)[:, None] * u[None, :]
    _, S, Vh = torch.linalg.svd(R, full_matrices=False)
    # rank tolerance at float32 precision (the states come from float32 or lower)
    tol = max(float(S[0]) if S.numel() else 0.0, 1e-30) * max(R.shape) * torch.finfo(torch.float32).eps
    r = int((S > tol).sum())
    if r < k - 1 and at_most:
        k = r + 1
        if k == 1:
            return u[:, None].float()
    elif r < k - 1:
        raise NumericsError(f"only {r} directions besides the mean difference carry variance in {D.shape[0]} "
                            f"rows; use k <= {r + 1} or more prompts")
    Q, _ = torch.linalg.qr(torch.cat([u[:, None], Vh[:k - 1].T], 1))
    Q = Q * torch.sign(torch.diagonal(Q.T @ torch.cat([u[:, None], Vh[:k - 1].T], 1)))[None, :]
    return Q.float()


def contrast_basis(A: torch.Tensor, B: torch.Tensor, k: int) -> torch.Tensor:
    """Labelled handle ``[d, k]``: aligned states ``A [Na, d]`` vs neutral states ``B [Nb, d]``
    (difference data ``A - mean(B)``, mean-difference direction first)."""
    u = difference_in_means(A, B)
    return orthonormal_around(A.double() - B.double().mean(0), u, k)


def diff_basis(tuned: torch.Tensor, base: torch.Tensor, k: int, at_most: bool = False) -> torch.Tensor:
    """Label-free handle ``[d, k]`` from the same prompts through both models: ``D = tuned - base``
    (``[N, d]`` each, row i = prompt i (or one position of it) on both sides), mean difference first.
    ``at_most``: fewer columns where the difference has fewer directions (exact low rank)."""
    if tuned.shape != base.shape:
        raise ConfigError(f"diff_basis needs paired states of one width, got {tuple(tuned.shape)} and "
                          f"{tuple(base.shape)}; for models of different widths use contrast_basis in "
                          "the tuned model's space")
    D = _rows(tuned, "tuned") - _rows(base, "base")
    return orthonormal_around(D, _unit(D.mean(0), "mean(tuned - base)"), k, at_most)


def random_basis(d: int, k: int, seed: int = 0) -> torch.Tensor:
    """A random orthonormal ``[d, k]`` basis (QR of a seeded Gaussian): the control of the same rank.
    The basis for k is the first k columns of the basis for any larger k (same seed)."""
    if not 1 <= k <= d:
        raise ConfigError(f"k must be in 1..{d}, got {k}")
    g = torch.Generator().manual_seed(int(seed))
    G = torch.stack([torch.randn(d, generator=g, dtype=torch.float64) for _ in range(k)], 1)  # nested in k
    Q, Rm = torch.linalg.qr(G)
    return (Q * torch.sign(torch.diagonal(Rm))[None, :]).float()


def project_in(H: torch.Tensor, U: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``H + alpha (H U) U^T``: ``H [..., d]``, ``U [d, k]`` -> ``[..., d]`` (dtype of H, math in float32)."""
    Hf, Uf = H.float(), U.to(H.device).float()
    return (Hf + float(alpha) * (Hf @ Uf) @ Uf.T).to(H.dtype)


def project_out(H: torch.Tensor, U: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``H - alpha (H U) U^T``: ``H [..., d]``, ``U [d, k]`` -> ``[..., d]``; alpha = 1 removes span(U)."""
    return project_in(H, U, -float(alpha))


def _check_ablate_alpha(alpha: float) -> None:
    if not 0.0 <= float(alpha) <= 1.0:
        raise ConfigError(f"ablation alpha must be in [0, 1] (1 removes the difference in the subspace; "
                          f"above 1 would reflect it), got {alpha}")


def ablate_toward(H: torch.Tensor, U: torch.Tensor, ref: torch.Tensor | None, alpha: float = 1.0) -> torch.Tensor:
    """``H + alpha ((ref - H) U) U^T``: ``H [..., d]``, ``ref`` ``[d]`` or like ``H`` (None: 0),
    ``alpha`` in [0, 1]."""
    _check_ablate_alpha(alpha)
    Hf, Uf = H.float(), U.to(H.device).float()
    R = torch.zeros_like(Hf) if ref is None else ref.to(H.device).float()
    return (Hf + float(alpha) * ((R - Hf) @ Uf) @ Uf.T).to(H.dtype)


def fit_map(U: torch.Tensor, tuned: torch.Tensor, base: torch.Tensor, ridge: float = 1e-6
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A [k, k], c [k])`` with ``tuned U ~ (base U) A + c`` (least squares over the rows of the paired
    states ``[N, d]``; a ridge of ``ridge x`` the mean squared projection keeps it defined for N <= k)."""
    if tuned.shape != base.shape or tuned.shape[-1] != U.shape[0]:
        raise ConfigError(f"fit_map needs paired states [N, {U.shape[0]}], got {tuple(tuned.shape)}, {tuple(base.shape)}")
    Uf = U.double()
    X, Y = _rows(base, "base") @ Uf, _rows(tuned, "tuned") @ Uf
    X1 = torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)
    lam = ridge * float(X.pow(2).mean()) * X.shape[0]
    reg = lam * torch.eye(X1.shape[1], dtype=X.dtype)
    reg[-1, -1] = 0.0                                               # the offset is not shrunk
    W = torch.linalg.solve(X1.T @ X1 + reg, X1.T @ Y)              # [k + 1, k]
    return W[:-1].float(), W[-1].float()


def map_step(H: torch.Tensor, U: torch.Tensor, A: torch.Tensor, c: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    """``H + alpha ((H U)(A - I) + c) U^T``: alpha = 1 puts the predicted tuned component in span(U)."""
    Hf, Uf = H.float(), U.to(H.device).float()
    M = A.to(H.device).float() - torch.eye(A.shape[0], device=H.device)
    return (Hf + float(alpha) * ((Hf @ Uf) @ M + c.to(H.device).float()) @ Uf.T).to(H.dtype)


def _final_norm(model) -> torch.nn.Module:
    inner = getattr(model, "base_model", model)
    for name in ("norm", "ln_f", "final_layer_norm", "final_norm"):
        m = getattr(inner, name, None)
        if isinstance(m, torch.nn.Module):
            return m
    raise SiteError(f"{type(model).__name__}: no final norm found (looked for norm, ln_f, final_layer_norm)")


@torch.no_grad()
def logit_lens(model, tokenizer, basis: torch.Tensor, top: int = 8) -> list[dict]:
    """What each basis vector says in words: ``u`` read through the model's final norm and unembedding
    (``W_U (norm(u) - norm(0))``; norm(0) removes a LayerNorm bias), one dict per column with the
    ``top`` promoted and suppressed tokens (decoded) and their logit scores."""
    head = model.get_output_embeddings()
    if head is None:
        raise SiteError(f"{type(model).__name__} has no output embeddings (LM head)")
    norm = _final_norm(model)
    from mechdiff.scale.devices import offloaded_weight
    W = offloaded_weight(head)                  # the head's weight (its stored copy when offloaded)
    U = basis.to(W.device, torch.float32)
    if U.shape[0] != W.shape[1]:
        raise SiteError(f"basis width {U.shape[0]} does not match the model's width {W.shape[1]}")
    x = U.T.to(W.dtype)[None]                                          # [1, k, d]
    y = (norm(x) - norm(torch.zeros_like(x)))[0].float().to(W.device)  # [k, d] (norm may sit on another GPU)
    logits = (y.to(W.dtype) @ W.T).float()                            # [k, V] (no float32 copy of W_U)
    n = min(top, logits.shape[1])
    out = []
    for row in logits:
        hi, lo = row.topk(n), (-row).topk(n)
        dec = lambda ids: [tokenizer.decode([int(i)]) for i in ids]  # noqa: E731
        out.append({"promoted": dec(hi.indices), "promoted_logit": [round(float(v), 4) for v in hi.values],
                    "suppressed": dec(lo.indices), "suppressed_logit": [round(-float(v), 4) for v in lo.values]})
    return out


# ---------------------------------------------------------------------------------------- handle
@dataclass
class Handle:
    """A rank-k handle at one site: ``basis [d, k]`` plus how to apply it (``mode``, ``alpha``).

    Two lines from Python::

        h = Handle.load("runs/x/handles/L24_resid_post_diff_k2_ablate")
        with h.apply(model): model.generate(...)       # every position, every forward in the block
        with h.apply(model, batch.decision): ...       # the decision token only, as in the sweep
    """

    layer: int
    site: str
    basis: torch.Tensor
    mode: str = "ablate"
    alpha: float = 1.0
    scale: float = 1.0
    provenance: dict = field(default_factory=dict)
    reference: torch.Tensor | None = None    # [d] ablate: the other model's mean state (None: 0)
    matrix: torch.Tensor | None = None       # [k, k] map: tuned U ~ (base U) A + c
    offset: torch.Tensor | None = None       # [k]    map: c

    def __post_init__(self):
        if self.mode not in MODES:
            raise ConfigError(f"handle mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not (math.isfinite(float(self.alpha)) and math.isfinite(float(self.scale))):
            raise NumericsError(f"handle alpha / scale are not finite ({self.alpha}, {self.scale})")
        U = self.basis
        if U.dim() != 2 or U.shape[1] < 1:
            raise DataError(f"handle basis must be [d, k], got {tuple(U.shape)}")
        err = float((U.double().T @ U.double() - torch.eye(U.shape[1], dtype=torch.float64)).abs().max())
        if not err < 1e-3:
            raise NumericsError(f"handle basis columns are not orthonormal (max |U^T U - I| = {err:.2g})")
        self.basis = U.detach().float().cpu().contiguous()
        self.alpha, self.scale = float(self.alpha), float(self.scale)
        if self.mode == "ablate":
            _check_ablate_alpha(self.alpha)
        if self.mode == "map" and (self.matrix is None or self.offset is None or tuple(self.matrix.shape) !=
                                   (self.k, self.k) or tuple(self.offset.shape) != (self.k,)):
            raise ConfigError(f"a map handle needs matrix [{self.k}, {self.k}] and offset [{self.k}] "
                              "(analyses.steering.fit_map)")
        if self.reference is not None and tuple(self.reference.shape) != (U.shape[0],):
            raise DataError(f"handle reference must be [{U.shape[0]}], got {tuple(self.reference.shape)}")
        for name in ("reference", "matrix", "offset"):
            t = getattr(self, name)
            if t is not None:
                if not torch.isfinite(t).all():
                    raise NumericsError(f"handle {name} contains NaN/Inf")
                setattr(self, name, t.detach().float().cpu().contiguous())

    @property
    def k(self) -> int:
        return int(self.basis.shape[1])

    @property
    def key(self) -> str:
        return f"{self.site}.{self.layer}"

    def edit(self, t: torch.Tensor, reference: torch.Tensor | None = None) -> torch.Tensor:
        """The intervention on a site tensor ``[..., d]`` (``[B, T, H, hd]`` head sites are flattened);
        ``reference`` (ablate): broadcastable to it, instead of the handle's own."""
        flat = t.reshape(*t.shape[:-2], -1) if self.site == "head_z" else t
        U = self.basis.to(flat.device)
        if self.mode == "add":
            new = (flat.float() + self.alpha * self.scale * U[:, 0]).to(t.dtype)
        elif self.mode == "ablate":
            new = ablate_toward(flat, U, self.reference if reference is None else reference, self.alpha)
        elif self.mode == "map":
            new = map_step(flat, U, self.matrix, self.offset, self.alpha)
        else:
            new = project_in(flat, U, self.alpha)
        return new.reshape(t.shape)

    @contextmanager
    def apply(self, model, positions: torch.Tensor | None = None, reference: torch.Tensor | None = None
              ) -> Iterator[None]:
        """Apply the handle inside the ``with`` block: at every position of every forward pass, or with
        ``positions [B]`` (e.g. ``batch.decision``, what the sweep patches) at those positions of
        passes that contain them (the prompt pass; later cached decoding steps are left alone).
        ``reference [B, d]`` (ablate, with ``positions``): the other model's state per prompt, as in
        the sweep (default: the handle's own reference)."""
        from mechdiff.sites.hooks import intervene

        def at_positions(t):
            if t.shape[1] <= int(positions.max()):
                return None
            rows, pos = torch.arange(t.shape[0], device=t.device), positions.to(t.device)
            out = t.clone()
            out[rows, pos] = self.edit(t[rows, pos], None if reference is None else reference.to(t.device))
            return out
        with intervene(model, {self.key: self.edit if positions is None else at_positions}):
            yield

    def patch(self, reference: torch.Tensor | None = None):
        """The same intervention as one :class:`mechdiff.patching.Patch` for the patching engine: the
        engine mode of the same name and the same alpha (``map``: affine with ``M = A - I``).
        ``reference`` (ablate only): ``[N, d]`` per-prompt states of the other model at the site, used
        instead of the handle's ``reference`` (the sweep's ablation)."""
        from mechdiff.patching import Patch
        U, a = self.basis, self.alpha
        if self.mode == "add":
            return Patch(self.key, self.scale * U[:, 0], mode="add", alpha=a)
        if self.mode == "map":
            M = self.matrix - torch.eye(self.k)
            return Patch(self.key, self.offset @ U.T, mode="affine", basis=U, matrix=M, alpha=a)
        if self.mode == "steer":
            return Patch(self.key, mode="steer", basis=U, alpha=a)
        ref = self.reference if reference is None else reference.float()
        return Patch(self.key, ref, mode="ablate", basis=U, alpha=a)

    # ---- artifact: <prefix>.safetensors (basis) + <prefix>.json (everything else)
    def save(self, prefix) -> tuple[Path, Path]:
        from safetensors.torch import save

        from mechdiff.atomic import atomic_write_bytes, atomic_write_text, dumps_json
        prefix = Path(prefix)
        prefix.parent.mkdir(parents=True, exist_ok=True)
        meta = {"format": FORMAT, "version": VERSION, "layer": int(self.layer), "site": self.site, "k": self.k,
                "d": int(self.basis.shape[0]), "mode": self.mode, "alpha": self.alpha, "scale": self.scale,
                "provenance": self.provenance}
        tensors = {"basis": self.basis, **{n: getattr(self, n) for n in ("reference", "matrix", "offset")
                                           if getattr(self, n) is not None}}
        st = atomic_write_bytes(prefix.with_name(prefix.name + ".safetensors"), save(tensors))
        js = atomic_write_text(prefix.with_name(prefix.name + ".json"), dumps_json(meta))
        return st, js

    @classmethod
    def load(cls, prefix, mode: str | None = None, alpha: float | None = None) -> "Handle":
        """Load ``<prefix>.json`` + ``<prefix>.safetensors`` (``mode``/``alpha`` override the saved ones)."""
        from safetensors.torch import load_file
        prefix = Path(prefix)
        js, st = prefix.with_name(prefix.name + ".json"), prefix.with_name(prefix.name + ".safetensors")
        if not js.is_file() or not st.is_file():
            raise DataError(f"no handle at {prefix} (need {js.name} and {st.name})")
        meta: dict[str, Any] = json.loads(js.read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT:
            raise DataError(f"{js} is not a mechdiff handle (format {meta.get('format')!r})")
        ts = load_file(str(st))
        basis = ts["basis"]
        if tuple(basis.shape) != (meta["d"], meta["k"]):
            raise DataError(f"{st}: basis shape {tuple(basis.shape)} does not match the JSON "
                            f"({meta['d']}, {meta['k']})")
        return cls(layer=meta["layer"], site=meta["site"], basis=basis, mode=mode or meta["mode"],
                   alpha=meta["alpha"] if alpha is None else alpha, scale=meta.get("scale", 1.0),
                   provenance=meta.get("provenance", {}), reference=ts.get("reference"), matrix=ts.get("matrix"),
                   offset=ts.get("offset"))
