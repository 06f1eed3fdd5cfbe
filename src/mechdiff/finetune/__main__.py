"""Command line: ``python -m mechdiff.finetune {math,culture} [options]`` or ``... verify DIR``.

    python -m mechdiff.finetune math --out runs/finetune/smollm2-math-lora        # GPU: minutes
    python -m mechdiff.finetune culture --smoke --out /tmp/smoke                   # CPU: seconds
    python -m mechdiff.finetune verify src/mechdiff/finetune/adapters/smollm2-math-lora
    python -m mechdiff.finetune write-sets          # rewrite the shipped held-out prompt sets
    python -m mechdiff.finetune ladder --out src/mechdiff/finetune/adapters   # the known-answer ladder (CPU)
    python -m mechdiff.finetune culture-l20-r4 --out /tmp/l20r4                # one ladder adapter
"""
from __future__ import annotations

import argparse
import sys

from mechdiff.finetune.recipes import LADDER


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mechdiff.finetune", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    for task in ("math", "culture", *LADDER, "ladder"):
        what = ("every known-answer ladder adapter (out: their parent directory)" if task == "ladder"
                else f"the {task} LoRA adapter")
        p = sub.add_parser(task, help=f"train {what}, evaluate it, write it with its card")
        p.add_argument("--out", help="adapter directory to write (replaced); default runs/finetune/<name>")
        p.add_argument("--base", help="base model spec (default smollm2-135m; 'tiny' = random tiny Llama)")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--smoke", action="store_true", help="a few CPU steps on 8 examples (tiny model)")
        p.add_argument("--device", help="cuda / cpu (default: cuda if available)")
        p.add_argument("--max-steps", type=int, help="cap the number of optimiser steps")
        p.add_argument("--no-eval", action="store_true", help="skip the base-vs-tuned evaluation")
    v = sub.add_parser("verify", help="check that an adapter's card lists its files with their sha256")
    v.add_argument("dir")
    w = sub.add_parser("write-sets", help="write the held-out prompt sets (finetune/sets/*.jsonl)")
    w.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.cmd == "verify":
        from mechdiff.finetune.card import verify_card

        problems = verify_card(a.dir)
        print("\n".join(problems) if problems else f"{a.dir}: card matches its files")
        return 1 if problems else 0
    if a.cmd == "write-sets":
        from mechdiff.finetune.heldout import write_sets

        for p in write_sets(seed=a.seed):
            print(p)
        return 0
    from mechdiff.finetune.pipeline import finetune

    card = finetune(a.cmd, a.out, base=a.base, seed=a.seed, smoke=a.smoke, device=a.device,
                    evaluate=not a.no_eval, max_steps=a.max_steps)
    if a.cmd == "ladder":
        card = {"headline": {k: c["headline"] for k, c in card.items()}}
    if "headline" in card:
        import json

        print(json.dumps(card["headline"], indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
