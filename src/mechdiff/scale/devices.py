"""Placement of one model over several devices (accelerate's ``device_map`` / ``max_memory``).

A *placement* is what ``from_pretrained`` gets: ``device_map`` is a strategy (``"auto"``,
``"balanced"``, ``"balanced_low_0"``, ``"sequential"``), one device (``"cpu"``, ``"cuda:1"``), or a
user map ``{module name: device}`` (device: GPU index, ``"cuda:N"``, ``"cpu"``, ``"disk"``);
``max_memory`` ``{GPU index | "cpu" | "disk": bytes | "70GiB"}`` caps a strategy. The forms the CLI
and the pair TOML accept::

    --device-map auto                       device_map = "auto"
    --device-map model.embed_tokens=0,model.layers.0=0,model.layers.1=1,model.norm=1,lm_head=1
    --device-map placement.json             device_map = { "model.layers.0" = 0, ... }
    --max-memory 0=70GiB,1=70GiB,cpu=200GiB max_memory = { 0 = "70GiB", 1 = "70GiB" }

A sharded model takes its inputs on the device of its input embeddings (:func:`input_device`);
accelerate's hooks move activations from layer to layer, and every mechdiff hook moves what it
writes to the device of the tensor it edits.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from mechdiff.errors import ConfigError

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?\s*$", re.IGNORECASE)
_DEVICE = re.compile(r"^(cpu|disk|mps|cuda(:\d+)?|xpu(:\d+)?|npu(:\d+)?|\d+)$")
_UNITS = {"b": 1, "kb": 10 ** 3, "mb": 10 ** 6, "gb": 10 ** 9, "tb": 10 ** 12,
          "kib": 2 ** 10, "mib": 2 ** 20, "gib": 2 ** 30, "tib": 2 ** 40}


@dataclass(frozen=True)
class Placement:
    """A checked ``device_map`` (+ ``max_memory``, + ``offload_folder`` when a module goes to disk)."""

    device_map: "str | dict"
    max_memory: "dict | None" = None
    offload_folder: "str | None" = None

    def kwargs(self) -> dict:
        """Keyword arguments for ``from_pretrained``."""
        kw: dict[str, Any] = {"device_map": self.device_map}
        if self.max_memory is not None:
            kw["max_memory"] = dict(self.max_memory)
        if self.offload_folder is not None:
            kw["offload_folder"] = self.offload_folder
        return kw

    def describe(self) -> str:
        """One line for manifests and logs (a user map: its devices)."""
        if isinstance(self.device_map, str):
            s = self.device_map
        else:
            s = "map:" + ",".join(sorted({str(v) for v in self.device_map.values()}))
        return s + (f" max_memory={self.max_memory}" if self.max_memory else "")


def _device_value(v: Any, where: str) -> "int | str":
    """One device of a user map: GPU index (int), "cuda:N", "cpu", "disk", ..."""
    if isinstance(v, bool):
        raise ConfigError(f"{where}: device {v!r} is not a device; use a GPU index, cuda:N, cpu or disk")
    if isinstance(v, int):
        if v < 0:
            raise ConfigError(f"{where}: GPU index {v} is negative; use 0, 1, ... or cpu / disk")
        return v
    s = str(v).strip()
    if not _DEVICE.match(s):
        raise ConfigError(f"{where}: {v!r} is not a device; use a GPU index (0, 1, ...), cuda:N, cpu or disk")
    return int(s) if s.isdigit() else s


def parse_size(v: Any, where: str) -> "int | str":
    """A memory size: bytes (int) or a string like ``"70GiB"`` / ``"500MB"`` (kept as written)."""
    if isinstance(v, bool) or (isinstance(v, (int, float)) and v <= 0):
        raise ConfigError(f"{where}: memory size {v!r} must be a positive number of bytes or e.g. 70GiB")
    if isinstance(v, (int, float)):
        return int(v)
    m = _SIZE.match(str(v))
    if not m or float(m.group(1)) <= 0:
        raise ConfigError(f"{where}: memory size {v!r} is not understood; write e.g. 70GiB, 500MB or a byte count")
    return int(m.group(1)) if m.group(2) is None and m.group(1).isdigit() else str(v).strip()


def size_bytes(v: "int | str") -> int:
    """Bytes of a size accepted by :func:`parse_size`."""
    if isinstance(v, int):
        return v
    m = _SIZE.match(v)
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "b").lower()])


def _split_pairs(text: str, flag: str) -> list[tuple[str, str]]:
    out = []
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        if "=" not in item:
            raise ConfigError(f"{flag}: {item!r} is not NAME=VALUE; write e.g. {flag} "
                              + ("0=70GiB,1=70GiB" if "memory" in flag else "model.layers.0=0,model.layers.1=1"))
        k, v = item.split("=", 1)
        out.append((k.strip(), v.strip()))
    return out


def parse_device_map(v: Any, where: str = "--device-map") -> "str | dict | None":
    """Normalise a device_map given as a strategy, one device, ``"name=dev,..."``, a JSON file path,
    or a mapping. ConfigError says what is accepted."""
    if v is None or v == "":
        return None
    if isinstance(v, Mapping):
        if not v:
            raise ConfigError(f"{where}: the device map is empty; name at least one module, e.g. {{\"\": 0}}")
        return {str(k): _device_value(d, f"{where} [{k}]") for k, d in v.items()}
    if not isinstance(v, str):
        raise ConfigError(f"{where}: expected a string or a table, got {type(v).__name__}")
    s = v.strip()
    if s in STRATEGIES:
        return s
    if s.endswith(".json"):
        p = Path(s).expanduser()
        if not p.is_file():
            raise ConfigError(f"{where}: {p} does not exist; give a JSON file of {{module: device}}")
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except ValueError as e:
            raise ConfigError(f"{where}: {p} is not valid JSON ({e})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: {p} must hold a JSON object {{module: device}}")
        return parse_device_map(data, where)
    if "=" in s:
        return parse_device_map(dict(_split_pairs(s, where)), where)
    if _DEVICE.match(s):
        return s if not s.isdigit() else {"": int(s)}
    raise ConfigError(f"{where}: {v!r} is not a device map; use one of {', '.join(STRATEGIES)}, a device "
                      f"(cpu, cuda:1), module=device pairs (model.layers.0=0,...) or a .json file")


SIDES = ("base", "tuned")


def parse_max_memory(v: Any, where: str = "--max-memory") -> "dict | None":
    """``{GPU index | "cpu" | "disk": size}`` from ``"0=70GiB,cpu=100GiB"`` or a mapping.

    Per side (the two models on disjoint GPUs): ``"base:0=70GiB,base:1=70GiB,tuned:2=70GiB"`` or
    ``{"base": {...}, "tuned": {...}}`` -> ``{"base": {0: ...}, "tuned": {2: ...}}`` (see
    :func:`side_memory`)."""
    if v is None or v == "" or v == {}:
        return None
    if isinstance(v, str):
        items = _split_pairs(v, where)
        if any(k.split(":", 1)[0] in SIDES for k, _ in items):
            per: dict = {}
            for k, size in items:
                side, _, dev = k.partition(":")
                if side not in SIDES or not dev:
                    raise ConfigError(f"{where}: {k!r}: with per-side sizes every key is base:DEVICE or "
                                      "tuned:DEVICE (e.g. base:0=70GiB,tuned:1=70GiB)")
                per.setdefault(side, {})[dev] = size
            v = per
        else:
            v = dict(items)
    if not isinstance(v, Mapping):
        raise ConfigError(f"{where}: expected e.g. 0=70GiB,1=70GiB or a table, got {type(v).__name__}")
    if v and set(map(str, v)) <= set(SIDES):
        return {str(side): parse_max_memory(dict(m) if isinstance(m, Mapping) else m, f"{where} [{side}]")
                for side, m in v.items()}
    out: dict = {}
    for k, size in v.items():
        key = str(k).strip()
        if key.startswith("cuda:"):
            key = key[5:]
        if key.isdigit():
            dev: "int | str" = int(key)
        elif key in ("cpu", "disk", "mps"):
            dev = key
        else:
            raise ConfigError(f"{where}: {k!r} is not a device; keys are GPU indices (0, 1, ...), cpu or disk")
        out[dev] = parse_size(size, f"{where} [{k}]")
    return out


def side_memory(max_memory: "dict | None", side: str) -> "dict | None":
    """The max_memory of one side: the per-side entry when given per side, else the shared one."""
    if max_memory and set(map(str, max_memory)) <= set(SIDES):
        return max_memory.get(side)
    return max_memory


def placement(device_map: Any, max_memory: Any = None, offload_folder: str | None = None) -> Placement | None:
    """A checked :class:`Placement`, or None without a device_map (max_memory alone is an error)."""
    dm = parse_device_map(device_map)
    mm = parse_max_memory(max_memory)
    if dm is None:
        if mm is not None:
            raise ConfigError("--max-memory caps an automatic placement; give --device-map auto (or balanced, "
                              "sequential) with it")
        return None
    if mm is not None and not (isinstance(dm, str) and dm in STRATEGIES):
        raise ConfigError(f"--max-memory applies to --device-map {'|'.join(STRATEGIES)}, not to {dm!r}; a "
                          "user map already says where each module goes")
    if isinstance(dm, dict) and "disk" in dm.values() and offload_folder is None:
        import tempfile
        offload_folder = tempfile.mkdtemp(prefix="mechdiff-offload-")
    return Placement(dm, mm, offload_folder)


def check_visible(p: Placement | None) -> None:
    """ConfigError when the placement names a GPU that torch does not see here."""
    if p is None:
        return
    import torch
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    used: list = []
    if isinstance(p.device_map, dict):
        used += list(p.device_map.values())
    elif p.device_map not in STRATEGIES:
        used.append(p.device_map)
    used += list((p.max_memory or {}).keys())
    for d in used:
        idx = d if isinstance(d, int) else (int(d.split(":")[1]) if isinstance(d, str) and d.startswith("cuda:")
                                             else (0 if d == "cuda" else None))
        if idx is not None and idx >= n:
            raise ConfigError(f"the placement names GPU {idx} but torch sees {n} GPU(s) here; use GPU indices "
                              f"below {n}, cpu, or --device-map auto")


def _hook_device(hook) -> "Any":
    if hook is None:
        return None
    dev = getattr(hook, "execution_device", None)
    if dev is None:
        for h in getattr(hook, "hooks", ()) or ():      # accelerate's SequentialHook
            dev = _hook_device(h)
            if dev is not None:
                break
    if dev is None:
        return None
    import torch
    return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)


def input_device(model) -> "Any":
    """The device a model takes its inputs on: where its input embeddings run (accelerate's
    execution device when they are dispatched or offloaded), else its first parameter's device."""
    import torch
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for mod in (emb, model):
        dev = _hook_device(getattr(mod, "_hf_hook", None)) if mod is not None else None
        if dev is not None:
            return dev
    if emb is not None and getattr(emb, "weight", None) is not None and emb.weight.device.type != "meta":
        return emb.weight.device
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


def model_devices(model) -> list[str]:
    """The devices a model's modules run on (``hf_device_map`` values, else its parameters')."""
    dm = getattr(model, "hf_device_map", None)
    if dm:
        vals = {f"cuda:{v}" if isinstance(v, int) else str(v) for v in dm.values()}
    else:
        vals = {str(p.device) for p in model.parameters()}
    return sorted(vals)


def offloaded_weight(module, name: str = "weight"):
    """A parameter that accelerate keeps off the module (its ``weights_map``: CPU RAM or disk) while
    the module is not running; the module's own parameter when it is not offloaded."""
    w = getattr(module, name)
    if w.device.type != "meta":
        return w
    hook = getattr(module, "_hf_hook", None)
    hooks = [hook] + list(getattr(hook, "hooks", ()) or ())
    for h in hooks:
        wm = getattr(h, "weights_map", None)
        if wm is not None:
            try:
                return wm[name]
            except KeyError:
                pass
    from mechdiff.errors import SiteError
    raise SiteError(f"{type(module).__name__}.{name} is on the meta device and no offloaded copy was found; "
                    "load the model with a device_map that keeps it on a device")
