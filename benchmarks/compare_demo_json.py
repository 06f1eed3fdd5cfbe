"""Compare two demo output trees' JSON as parsed values, ignoring times, paths and durations.

    python benchmarks/compare_demo_json.py /work/baseline_demo /work/after_demo

Every ``*.json`` under the first tree is parsed and compared with the file at the same relative path
under the second: dict keys and list items recursively; floats exactly (the change must not move a
number); keys that hold times, durations, paths, hostnames or versions of the run environment are
ignored, and so is any string that contains either tree's root or looks like an absolute path. Prints one
line per differing value (at most 20 per file) and a total; exit status 1 when anything differs.
Files only in the second tree are listed (new artifacts, e.g. results/<stage>.json), not failures.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

IGNORED_KEYS = re.compile(r"(time|seconds|duration|elapsed|_s$|^t$|date|path|dir$|host|cwd|argv|command|history|"
                          r"created|started|finished|when|pid|version|python|torch|transformers|git|platform|"
                          r"config_file|source|cache)", re.I)
ABSPATH = re.compile(r"(^|[\s'\"=])/(work|tmp|root|home|private|var)/")


def _walk(a, b, where: str, out: list[str], roots: tuple[str, ...]) -> None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            if IGNORED_KEYS.search(str(k)):
                continue
            if k not in a or k not in b:
                out.append(f"{where}.{k}: only in {'after' if k not in a else 'before'}")
                continue
            _walk(a[k], b[k], f"{where}.{k}", out, roots)
    elif isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            out.append(f"{where}: length {len(a)} before, {len(b)} after")
        for i, (x, y) in enumerate(zip(a, b)):
            _walk(x, y, f"{where}[{i}]", out, roots)
    elif isinstance(a, str) and isinstance(b, str):
        if any(r in a or r in b for r in roots) or ABSPATH.search(a) or ABSPATH.search(b):
            return
        if a != b:
            out.append(f"{where}: {a[:80]!r} before, {b[:80]!r} after")
    elif a != b and not (isinstance(a, float) and isinstance(b, float) and a != a and b != b):
        out.append(f"{where}: {a!r} before, {b!r} after")


def compare(before: Path, after: Path) -> int:
    roots = (str(before.resolve()), str(after.resolve()))
    n_files = n_diff = 0
    for f in sorted(before.rglob("*.json")):
        rel = f.relative_to(before)
        g = after / rel
        n_files += 1
        if not g.is_file():
            print(f"{rel}: missing after")
            n_diff += 1
            continue
        diffs: list[str] = []
        _walk(json.loads(f.read_text(encoding="utf-8")), json.loads(g.read_text(encoding="utf-8")), "", diffs, roots)
        if diffs:
            n_diff += 1
            print(f"{rel}: {len(diffs)} value(s) differ")
            for d in diffs[:20]:
                print(f"    {d}")
    new = sorted(str(g.relative_to(after)) for g in after.rglob("*.json") if not (before / g.relative_to(after)).exists())
    print(f"{n_files} JSON files compared, {n_diff} differ; {len(new)} new after: {', '.join(new) or 'none'}")
    return 1 if n_diff else 0


if __name__ == "__main__":
    sys.exit(compare(Path(sys.argv[1]), Path(sys.argv[2])))
