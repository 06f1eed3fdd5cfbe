"""One rank of the data-parallel test (tests/test_scale.py): run as a plain script with torchrun's
environment variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or imported for the
single-process reference. Writes its results to ``OUT/rank{RANK}.safetensors``."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

PROMPTS = [{"id": f"p{i}", "text": "word " * (1 + (7 * i) % 11) + f"end {i}"} for i in range(11)]


def compute(run_dir: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Capture both sides, the clean run and a patch sweep on two tiny models; returns tensors and info."""
    from mechdiff.experiments.steps import capture_sides, clean_run, kl_to_clean, patch_measure
    from mechdiff.models.tiny import tiny_model
    from mechdiff.patching import Patch
    from mechdiff.scale.distributed import private_dir, world

    torch.manual_seed(0)
    sides = {}
    for name, seed in (("base", 0), ("tuned", 1)):
        m, tok = tiny_model("llama", seed=seed, n_layers=3)
        sides[name] = SimpleNamespace(model=m, tokenizer=tok)
    study = SimpleNamespace(side=lambda s: sides[s], batch_size=3)
    out: dict[str, torch.Tensor] = {}
    cap = capture_sides(study, PROMPTS, ["resid_post.1", "attn_out.2"])
    capk = capture_sides(study, PROMPTS, ["resid_post.0"], positions=("k", 3), seed=5, sides=["tuned"])
    for s, c in cap.items():
        for k, v in c.tensors.items():
            out[f"cap.{s}.{k}"] = v
        out[f"cap.{s}.positions"] = c.positions
    out["capk.tuned.resid_post.0"] = capk["tuned"]["resid_post.0"]
    out["capk.tuned.valid"] = capk["tuned"].valid.to(torch.uint8)
    logits, states = clean_run(sides["base"], PROMPTS, ["resid_post.1"], batch_size=3, measure="decision")
    out["clean.logits"], out["clean.resid_post.1"] = logits, states["resid_post.1"]
    V = logits.shape[-1]
    variants = [Patch("resid_post.1", value=states["resid_post.1"]),
                Patch("mlp_out.2", value=torch.ones(64), mode="add", alpha=0.5)]
    seen: list = []
    kl = patch_measure(sides["tuned"], PROMPTS, variants, batch_size=3, reducer=kl_to_clean(list(range(V - 5))),
                       on_chunk=lambda eng, i, j: seen.append((i, j, eng.clean_logits.clone())))
    out["patch.kl"] = kl
    out["patch.chunk_clean"] = torch.cat([c for _, _, c in seen])
    rank, size = world()
    info = {"rank": rank, "world": size, "chunks": [[i, j] for i, j, _ in seen],
            "ids": cap["base"].ids, "private_dir": str(private_dir(run_dir))}
    return out, info


if __name__ == "__main__":
    from safetensors.torch import save_file
    dest, run_dir = Path(sys.argv[1]), Path(sys.argv[2])
    tensors, info = compute(run_dir)
    rank = int(os.environ["RANK"])
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(dest / f"rank{rank}.safetensors"))
    (dest / f"rank{rank}.json").write_text(json.dumps(info))
