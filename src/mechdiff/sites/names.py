"""Uniform site names for any supported decoder-only architecture.

A *site* is a place in the forward pass where a tensor can be read or written:

- ``resid_pre``  (layer l): the residual stream entering block l, ``[B, T, d]``.
- ``resid_post`` (layer l): the residual stream leaving block l, ``[B, T, d]``.
- ``attn_out``   (layer l): the attention branch's contribution added to the residual, ``[B, T, d]``
  (for Gemma-style sandwich norms, after ``post_attention_layernorm``).
- ``mlp_out``    (layer l): the MLP branch's contribution added to the residual, ``[B, T, d]``.
- ``head_z``     (layer l): the per-head attention outputs entering the output projection,
  ``[B, T, H, head_dim]`` (write here to ablate or patch single heads).
- ``head_out``   (layer l, read only): each head's contribution through the output projection,
  ``[B, T, H, d]`` (bias excluded; for sandwich-norm models it is the pre-norm contribution).

Resolution is structural (find the block list, then the attention/MLP/out-projection modules by the
names each family uses), done once per model and cached on it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from mechdiff.errors import SiteError

SITE_NAMES = ("resid_pre", "resid_post", "attn_out", "mlp_out", "head_z", "head_out")
READ_ONLY = ("head_out",)

_BLOCK_PATHS = ("model.layers", "model.language_model.layers", "transformer.h", "gpt_neox.layers",
                "model.decoder.layers", "layers", "h")
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_OPROJ_NAMES = ("o_proj", "c_proj", "dense", "out_proj")


def _get(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _first_child(module: nn.Module, names) -> tuple[str, nn.Module] | tuple[None, None]:
    for n in names:
        child = getattr(module, n, None)
        if isinstance(child, nn.Module):
            return n, child
    return None, None


@dataclass
class SiteMap:
    """Where each site lives in one model. Build with :func:`resolve`."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    head_dim: int
    blocks: list = field(repr=False)
    attn: list = field(repr=False)   # per layer: module whose output is attn_out
    mlp: list = field(repr=False)    # per layer: module whose output is mlp_out
    oproj: list = field(repr=False)  # per layer: the attention output projection
    ffn: list = field(repr=False)    # per layer: the MLP module itself (its input: the normed residual)

    def check(self, site: str, layer: int) -> None:
        """Raise SiteError unless ``site`` is known and ``0 <= layer < n_layers``."""
        if site not in SITE_NAMES:
            raise SiteError(f"unknown site {site!r}; known sites: {', '.join(SITE_NAMES)}")
        if not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise SiteError(
                f"layer {layer} is out of range for this {self.family} model with {self.n_layers} "
                f"layers: use 0..{self.n_layers - 1} (negative indices are not accepted)")

    def oproj_weight(self, layer: int) -> torch.Tensor:
        """Output projection as ``[d_model, n_heads * head_dim]`` (out x in), any family."""
        mod = self.oproj[layer]
        w = mod.weight
        if w.device.type == "meta":      # offloaded by accelerate (cpu/disk): its stored copy
            from mechdiff.scale.devices import offloaded_weight
            w = offloaded_weight(mod, "weight")
        if type(mod).__name__ == "Conv1D":  # GPT-2 stores [in, out]
            w = w.t()
        return w


@dataclass(frozen=True, order=True)
class Site:
    """A site key: a site name at a 0-based layer. ``str(Site("resid_post", 12)) == "resid_post.12"``
    (the string form used in artifacts and JSON); hashable, ordered by (name, layer), unpacks as
    ``name, layer = site``. Build from any key form with :meth:`Site.parse`."""

    name: str
    layer: int

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise SiteError(f"a site name must be a non-empty string, got {self.name!r}")
        if not isinstance(self.layer, int) or isinstance(self.layer, bool):
            raise SiteError(f"a site layer must be an integer, got {self.layer!r}")

    @classmethod
    def parse(cls, key) -> "Site":
        """Accept a Site, ``"resid_post.3"`` or ``("resid_post", 3)``."""
        if isinstance(key, Site):
            return key
        if isinstance(key, str):
            name, _, layer = key.rpartition(".")
            if not name or not layer.lstrip("-").isdigit():
                raise SiteError(f"site {key!r} is not of the form NAME.LAYER, e.g. 'resid_post.12'")
            return cls(name, int(layer))
        try:
            name, layer = key
            return cls(str(name), int(layer))
        except (TypeError, ValueError):
            raise SiteError(f"site {key!r} is not a NAME.LAYER string or a (name, layer) pair") from None

    def at(self, layer: int) -> "Site":
        """The same site name at another layer."""
        return Site(self.name, int(layer))

    def __str__(self) -> str:
        return f"{self.name}.{self.layer}"

    def __iter__(self):
        return iter((self.name, self.layer))


def sites_at(name: str, layers) -> list[Site]:
    """``Site(name, l)`` for each layer in ``layers``."""
    return [Site(name, int(l)) for l in layers]


def parse_site(key) -> tuple[str, int]:
    """Accept a :class:`Site`, ``("resid_post", 3)`` or ``"resid_post.3"``; return ``(name, layer)``."""
    return tuple(Site.parse(key))  # type: ignore[return-value]


def site_str(key) -> str:
    """The string form ``"NAME.LAYER"`` of any site key."""
    return str(Site.parse(key))


def resolve(model: nn.Module) -> SiteMap:
    """Find blocks and branch modules of ``model`` (an HF causal LM); cached on the model."""
    cached = getattr(model, "_mechdiff_sites", None)
    if cached is not None:
        return cached
    cfg = getattr(model, "config", None)
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    n_cfg = getattr(text_cfg, "num_hidden_layers", None) or getattr(text_cfg, "n_layer", None)
    blocks = None
    for path in _BLOCK_PATHS:
        cand = _get(model, path)
        if isinstance(cand, nn.ModuleList) and len(cand) > 0 and (n_cfg is None or len(cand) == n_cfg):
            blocks = cand
            break
    if blocks is None:  # structural fallback: the longest ModuleList matching the config depth
        lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)
                 and (n_cfg is None or len(m) == n_cfg)]
        if not lists:
            raise SiteError(f"could not find the transformer blocks of {type(model).__name__}; "
                            "mechdiff supports decoder-only HF causal LMs (Llama, Qwen2, Gemma, GPT-2, "
                            "GPT-NeoX families and look-alikes)")
        blocks = max(lists, key=len)
    attn, mlp, oproj, ffn = [], [], [], []
    for i, blk in enumerate(blocks):
        aname, a = _first_child(blk, _ATTN_NAMES)
        mname, m = _first_child(blk, _MLP_NAMES)
        if a is None or m is None:
            raise SiteError(f"block {i} of {type(model).__name__} has no attention/MLP child named "
                            f"{_ATTN_NAMES}/{_MLP_NAMES}; add its names to mechdiff.sites.names")
        _, o = _first_child(a, _OPROJ_NAMES)
        ffn.append(m)
        # Sandwich norms (Gemma 2/3): the branch output is normed before it joins the residual.
        if hasattr(blk, "pre_feedforward_layernorm") and hasattr(blk, "post_feedforward_layernorm"):
            a, m = blk.post_attention_layernorm, blk.post_feedforward_layernorm
        attn.append(a)
        mlp.append(m)
        oproj.append(o)
    d_model = getattr(text_cfg, "hidden_size", None) or getattr(text_cfg, "n_embd")
    n_heads = getattr(text_cfg, "num_attention_heads", None) or getattr(text_cfg, "n_head")
    head_dim = getattr(text_cfg, "head_dim", None) or d_model // n_heads
    sm = SiteMap(family=getattr(cfg, "model_type", type(model).__name__), n_layers=len(blocks),
                 d_model=d_model, n_heads=n_heads, head_dim=head_dim, blocks=list(blocks),
                 attn=attn, mlp=mlp, oproj=oproj, ffn=ffn)
    model.__dict__["_mechdiff_sites"] = sm  # plain attribute: not a submodule, not in state_dict
    return sm
