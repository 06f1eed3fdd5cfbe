"""Data parallel for one study under ``torchrun`` (one model copy per process).

::

    torchrun --nproc_per_node 2 -m mechdiff.cli rq1 --pair planted-cultural --out runs/dp

Every process runs the same stage code. The model-heavy steps (``experiments.steps``: capture of
both sides, the clean run, the chunked patch-and-measure loop) cut their work into the batches a
single process would run (same prompts per batch, same padding), give batch ``k`` to rank
``k mod world_size``, and gather the per-batch results to every rank in batch order, each batch
exactly once; so every rank holds the numbers one process computes, bit for bit, and the cheap math
after them runs identically everywhere. Rank 0 writes the run directory; the other ranks work in a
private copy of it taken when it is opened (so they resume exactly the steps rank 0 resumes), which
is deleted at exit: they write nothing in the user's run directory.

Without ``torchrun`` (no ``WORLD_SIZE`` > 1 in the environment and no process group) every function
here is a plain, single-process pass-through.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

_SHADOWS: dict[str, str] = {}


def _dist():
    import torch.distributed as dist
    return dist if dist.is_available() else None


def init(backend: str | None = None) -> bool:
    """Join the process group torchrun describes (``WORLD_SIZE`` > 1): NCCL with one GPU per process
    (``LOCAL_RANK``; ``"cuda"`` then means that GPU), else gloo. Idempotent. True when distributed."""
    dist = _dist()
    if dist is None:
        return False
    if dist.is_initialized():
        return dist.get_world_size() > 1
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("nccl" if cuda else "gloo"))
    return dist.get_world_size() > 1


def active() -> bool:
    """True inside a process group of more than one process (joined on first use)."""
    return init()


def world() -> tuple[int, int]:
    """``(rank, world_size)``; ``(0, 1)`` outside torchrun."""
    if not active():
        return 0, 1
    dist = _dist()
    return dist.get_rank(), dist.get_world_size()


def is_writer() -> bool:
    """Whether this process writes artifacts (rank 0, or the only process)."""
    return world()[0] == 0


def barrier() -> None:
    if active():
        _dist().barrier()


def _to_cpu(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().cpu()
    if isinstance(x, dict):
        return {k: _to_cpu(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_cpu(v) for v in x)
    return x


def map_items(items: Sequence, fn: Callable[[Any], Any]) -> list:
    """``[fn(x) for x in items]`` with item ``k`` computed on rank ``k mod world_size`` and every
    result gathered to every rank (tensors on CPU, in item order, each exactly once). ``fn`` must
    return tensors / dicts / lists / tuples of them / plain values. Outside torchrun: a plain loop."""
    if not active():
        return [fn(x) for x in items]
    rank, size = world()
    mine = {k: _to_cpu(fn(items[k])) for k in range(rank, len(items), size)}
    parts: list = [None] * size
    _dist().all_gather_object(parts, mine)      # in-memory transport between the ranks, not storage
    got: dict = {}
    for p in parts:
        got.update(p)
    return [got[k] for k in range(len(items))]


def private_dir(path: "str | os.PathLike") -> Path:
    """The run directory this process writes: ``path`` on rank 0 (and outside torchrun), else a
    private copy of it taken now (all ranks meet before and after the copy, so it holds what rank 0
    had when the run directory was opened), removed at exit."""
    path = Path(path)
    if not active():
        return path
    key = str(path.resolve())
    if key in _SHADOWS.values():          # already a private copy (a later stage of the same study)
        return path
    rank, _ = world()
    barrier()
    if rank != 0:
        shadow = _SHADOWS.get(key)
        if shadow is None:
            shadow = tempfile.mkdtemp(prefix=f"mechdiff-rank{rank}-")
            _SHADOWS[key] = shadow
            atexit.register(shutil.rmtree, shadow, True)
        if path.is_dir():
            shutil.copytree(path, shadow, dirs_exist_ok=True)
    barrier()
    return Path(_SHADOWS[key]) if rank != 0 else path


def from_rank0(fn: Callable[[], Any]) -> Any:
    """``fn()`` computed on rank 0 only and sent to every rank (a plain call outside torchrun)."""
    if not active():
        return fn()
    box = [fn() if world()[0] == 0 else None]
    _dist().broadcast_object_list(box, src=0)
    return box[0]
