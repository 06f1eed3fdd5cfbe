"""The known answer of a ladder adapter, computed from its shipped LoRA matrices, and its one loader.

`lora_deltas` reads ``adapter_model.safetensors`` and returns each adapted weight's update
``ΔW = (alpha / r) · B @ A`` (float32, ``[out, in]``): exactly what the loader merges into the base.

* an MLP down-projection ladder adapter (``culture-l20-rK``): ΔW's singular values, its effective
  rank (singular values above `RANK_REL_THRESHOLD` of the largest) and its column space (left
  singular vectors, ``[d_model, r]``, by singular value) saved as ``truth.safetensors``; the
  residual difference after that layer is ``ΔW @ m`` (m: the MLP's hidden activation, the same in
  both models), so it lies in this column space at every position;
* an attention ladder adapter (``math-attn-4``): per head, the Frobenius norm of its q / k / v / o
  weight change (k and v are shared by a group of query heads) and the norm relative to the head's
  base weights; the changed heads are every head of the adapted layers whose change is non-zero.

`load_truth(name)` returns a `LadderTruth` (the card's ``truth`` section plus the column space).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from mechdiff.errors import ConfigError

TRUTH_FILE = "truth.safetensors"
RANK_REL_THRESHOLD = 0.01
ADAPTERS_DIR = Path(__file__).resolve().parent / "adapters"
_LORA_PREFIX = "base_model.model."


def lora_deltas(adapter_dir: str | Path) -> dict[str, torch.Tensor]:
    """``{module name (e.g. model.layers.20.mlp.down_proj): ΔW [out, in] float32}`` of an adapter."""
    d = Path(adapter_dir)
    cfg = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))
    r, alpha = cfg["r"], cfg["lora_alpha"]
    scale = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r
    state = load_file(str(d / "adapter_model.safetensors"))
    out = {}
    for k, a in state.items():
        if ".lora_A." not in k:
            continue
        name = k.split(".lora_A.")[0].removeprefix(_LORA_PREFIX)
        b = state[k.replace(".lora_A.", ".lora_B.")]
        out[name] = (scale * (b.double() @ a.double())).float()
    return dict(sorted(out.items()))


def _layer_of(module: str) -> int:
    return int(module.split("layers.")[1].split(".")[0])


def mlp_truth(deltas: Mapping[str, torch.Tensor], out_dir: Path, lora_rank: int) -> dict[str, Any]:
    """Truth of a one-module MLP adapter; writes ``truth.safetensors`` (column_space, singular_values)."""
    (module, dw), = deltas.items()
    u, s, _ = torch.linalg.svd(dw.double(), full_matrices=False)
    r = min(lora_rank, int((s > 1e-6 * s[0]).sum()))  # B·A has rank <= r; the rest is float round-off
    eff = int((s > RANK_REL_THRESHOLD * s[0]).sum())
    save_file({"column_space": u[:, :r].float().contiguous(), "singular_values": s[:r].float().contiguous()},
              str(out_dir / TRUTH_FILE), metadata={"format": "pt", "module": module})
    layer = _layer_of(module)
    return {"kind": "mlp_low_rank", "changed_modules": [module], "layers": [layer], "first_changed_layer": layer,
            "site": f"residual stream after decoder layer {layer} (hidden_states[{layer + 1}])",
            "effective_rank": eff, "rank_rel_threshold": RANK_REL_THRESHOLD, "lora_rank": r,
            "singular_values": [float(f"{x:.6g}") for x in s[:r].tolist()],
            "column_space_file": TRUTH_FILE, "changed_heads": [], "mlp_changed": True,
            "statement": f"nothing changes below layer {layer}; the residual difference after layer {layer} "
                         f"lies in the column space of B·A ({TRUTH_FILE}: column_space [d_model, {r}])"}


def head_truth(deltas: Mapping[str, torch.Tensor], base_state: Mapping[str, torch.Tensor], n_heads: int,
               n_kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Truth of an attention adapter: per head, the norm of its weight change (absolute and relative)."""
    group = n_heads // n_kv_heads
    layers = sorted({_layer_of(m) for m in deltas})
    if any(".mlp." in m for m in deltas):
        raise ConfigError("an attention ladder adapter must not touch the MLP")
    per_head: dict[str, dict[str, float]] = {}
    changed = []
    for lay in layers:
        def part(proj: str, h: int, cols: bool = False) -> tuple[float, float]:
            name = f"model.layers.{lay}.self_attn.{proj}"
            dw, w = deltas.get(name), base_state[f"{name}.weight"].float()
            sl = slice(h * head_dim, (h + 1) * head_dim)
            wb = w[:, sl] if cols else w[sl]
            d = 0.0 if dw is None else float((dw[:, sl] if cols else dw[sl]).norm())
            return d, float(wb.norm())
        for h in range(n_heads):
            parts = {"q": part("q_proj", h), "k": part("k_proj", h // group), "v": part("v_proj", h // group),
                     "o": part("o_proj", h, cols=True)}
            tot = math.sqrt(sum(d * d for d, _ in parts.values()))
            base = math.sqrt(sum(b * b for _, b in parts.values()))
            per_head[f"{lay}.{h}"] = {**{k: float(f"{d:.6g}") for k, (d, _) in parts.items()},
                                      "total": float(f"{tot:.6g}"), "relative": float(f"{tot / base:.6g}")}
            if tot > 0:
                changed.append([lay, h])
    return {"kind": "attention_heads", "changed_modules": sorted(deltas), "layers": layers,
            "first_changed_layer": layers[0], "changed_heads": changed, "n_heads": n_heads,
            "n_kv_heads": n_kv_heads, "head_dim": head_dim, "mlp_changed": False,
            "head_weight_change": per_head,
            "head_weight_change_note": "Frobenius norm of the head's rows of ΔW_q, its kv group's rows of "
                                       "ΔW_k / ΔW_v and its columns of ΔW_o; total = root sum of squares; "
                                       "relative = total / the same norm of the base weights",
            "statement": f"the heads whose weights changed are exactly the {len(changed)} heads of layers "
                         f"{', '.join(map(str, layers))}; every MLP is untouched"}


@dataclass(frozen=True)
class LadderTruth:
    """A ladder adapter's known answer (``load_truth``).

    column_space: ``[d_model, r]`` orthonormal columns by singular value (MLP adapters; else None).
    changed_heads: ``(layer, head)`` pairs whose weights changed (attention adapters; else empty).
    head_weight_change: ``{(layer, head): total norm}`` for every head of the adapted layers;
    head_relative_change: the same over the norm of the head's base weights.
    """

    name: str
    kind: str
    layers: tuple[int, ...]
    first_changed_layer: int
    changed_modules: tuple[str, ...]
    effective_rank: int | None = None
    singular_values: tuple[float, ...] = ()
    column_space: torch.Tensor | None = None
    changed_heads: tuple[tuple[int, int], ...] = ()
    head_weight_change: dict[tuple[int, int], float] = field(default_factory=dict)
    head_relative_change: dict[tuple[int, int], float] = field(default_factory=dict)
    n_heads: int | None = None
    card: dict[str, Any] = field(default_factory=dict, repr=False)

    def basis(self, k: int | None = None) -> torch.Tensor:
        """The top ``k`` (default: effective rank) directions of the column space, ``[d_model, k]``."""
        if self.column_space is None:
            raise ConfigError(f"{self.name} has no column space (it is an attention adapter)")
        return self.column_space[:, : (k or self.effective_rank)]


def truth_dir(name: str | Path) -> Path:
    """Adapter directory of a ladder adapter: a path, or a shipped name with or without ``smollm2-``."""
    p = Path(name)
    if p.is_dir():
        return p
    s = str(name)
    for cand in (s, f"smollm2-{s}"):
        d = ADAPTERS_DIR / cand
        if (d / "card.json").is_file():
            return d
    raise ConfigError(f"no shipped ladder adapter named {name!r} (see {ADAPTERS_DIR})")


def load_truth(name: str | Path) -> LadderTruth:
    """The known answer of ladder adapter / pair ``name`` (e.g. ``smollm2-culture-l20-r4``)."""
    d = truth_dir(name)
    card = json.loads((d / "card.json").read_text(encoding="utf-8"))
    t = card.get("truth")
    if not t:
        raise ConfigError(f"{d} has no truth in its card (not a ladder adapter)")
    cs = None
    if t.get("column_space_file"):
        cs = load_file(str(d / t["column_space_file"]))["column_space"]
    per_head = {tuple(int(x) for x in k.split(".")): v for k, v in t.get("head_weight_change", {}).items()}
    return LadderTruth(name=card["name"], kind=t["kind"], layers=tuple(t["layers"]),
                       first_changed_layer=t["first_changed_layer"], changed_modules=tuple(t["changed_modules"]),
                       effective_rank=t.get("effective_rank"), singular_values=tuple(t.get("singular_values", ())),
                       column_space=cs, changed_heads=tuple(tuple(h) for h in t.get("changed_heads", ())),
                       head_weight_change={k: v["total"] for k, v in per_head.items()},
                       head_relative_change={k: v["relative"] for k, v in per_head.items()},
                       n_heads=t.get("n_heads"), card=card)
