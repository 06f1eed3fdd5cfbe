"""What every map shares: input checks (``_f64``, ``_pair``, ``_out``), the ``_Map`` base class with
save/restore (``<prefix>.safetensors`` + ``<prefix>.json``, the JSON recording the class name),
:func:`load_map` and the ``MAP_CLASSES`` registry it reads (filled by the package ``__init__`` once
every map module is imported, so that this module imports none of them: no import cycle), and the
trivial :class:`IdentityMap`."""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import load_file, save_file

from mechdiff.errors import ConfigError, DataError, NumericsError, SiteError


F64 = torch.float64
FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
def _f64(X, name: str) -> torch.Tensor:
    if not isinstance(X, torch.Tensor):
        X = torch.as_tensor(X)
    if X.ndim != 2:
        raise DataError(f"{name} must be [N, d], got shape {tuple(X.shape)}")
    if not bool(torch.isfinite(X).all()):
        raise NumericsError(f"{name} contains NaN/Inf; fix the activations before fitting a map")
    return X.to(F64)


def _pair(X, Y, min_rows: int = 2):
    X, Y = _f64(X, "X"), _f64(Y, "Y")
    if X.shape[0] != Y.shape[0]:
        raise DataError(f"X and Y need paired rows; got {X.shape[0]} and {Y.shape[0]}")
    if X.shape[0] < min_rows:
        raise DataError(f"need at least {min_rows} training rows, got {X.shape[0]}")
    return X, Y.to(X.device)


def _out(Yh: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return Yh.to(like.dtype) if like.is_floating_point() else Yh


# ----------------------------------------------------------------------------------------------
# base class + persistence
# ----------------------------------------------------------------------------------------------
class _Map:
    """Base class. Subclasses list tensor attributes in ``_tensors`` and JSON attributes in ``_fitted``."""

    _tensors: tuple = ()
    _fitted: tuple = ()

    def hparams(self) -> dict:
        return {}

    def _check_fitted(self):
        if not getattr(self, "fitted_", False):
            raise ConfigError(f"{type(self).__name__} is not fitted; call fit(X, Y) first")

    def _check_in(self, X) -> torch.Tensor:
        self._check_fitted()
        X64 = _f64(X, "X")
        if X64.shape[1] != self.dx_:
            raise SiteError(f"{type(self).__name__} was fitted on dx={self.dx_}, got X with {X64.shape[1]} columns")
        return X64

    def state(self) -> tuple[dict, dict]:
        """(JSON-able config, {name: tensor}) for saving."""
        tensors = {k: getattr(self, k) for k in self._tensors if getattr(self, k, None) is not None}
        fitted = {k: getattr(self, k, None) for k in self._fitted}   # None: saved before k existed
        cfg = dict(cls=type(self).__name__, format_version=FORMAT_VERSION, hparams=self.hparams(),
                   fitted=fitted, dx=self.dx_, dy=self.dy_,
                   shapes={k: list(v.shape) for k, v in tensors.items()})
        return cfg, tensors

    @classmethod
    def from_state(cls, cfg: dict, tensors: dict) -> "_Map":
        obj = cls(**cfg["hparams"])
        for k, v in cfg["fitted"].items():
            setattr(obj, k, v)
        for k in cls._tensors:
            setattr(obj, k, tensors.get(k))
        obj.dx_, obj.dy_ = cfg["dx"], cfg["dy"]
        obj.fitted_ = True
        return obj

    def save(self, path_prefix) -> tuple[str, str]:
        """Write ``<prefix>.safetensors`` and ``<prefix>.json`` (atomic renames). Returns both paths."""
        self._check_fitted()
        cfg, tensors = self.state()
        prefix = str(path_prefix)
        d = os.path.dirname(prefix)
        if d:
            os.makedirs(d, exist_ok=True)
        st, js = prefix + ".safetensors", prefix + ".json"
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, st + ".tmp")
        os.replace(st + ".tmp", st)
        with open(js + ".tmp", "w") as f:
            json.dump(cfg, f, indent=1)
        os.replace(js + ".tmp", js)
        return st, js

    def __repr__(self):
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams().items())
        return f"{type(self).__name__}({hp})"


def load_map(path_prefix, device=None) -> _Map:
    """Load a map written by ``save(path_prefix)``; tensors go to ``device`` (default CPU)."""
    prefix = str(path_prefix)
    try:
        with open(prefix + ".json") as f:
            cfg = json.load(f)
        tensors = load_file(prefix + ".safetensors", device=str(device) if device is not None else "cpu")
    except FileNotFoundError as e:
        raise ConfigError(f"no saved map at {prefix!r} (.json + .safetensors): {e}") from None
    name = cfg.get("cls")
    if name not in MAP_CLASSES:
        raise ConfigError(f"unknown map class {name!r} in {prefix}.json; known: {sorted(MAP_CLASSES)}")
    return MAP_CLASSES[name].from_state(cfg, tensors)


# ----------------------------------------------------------------------------------------------
# maps
# ----------------------------------------------------------------------------------------------
class IdentityMap(_Map):
    """Y_hat = X. Needs dx == dy (base and fine-tune share a basis)."""

    def fit(self, X, Y, X_val=None, Y_val=None) -> "IdentityMap":
        X, Y = _pair(X, Y, 1)
        if X.shape[1] != Y.shape[1]:
            raise SiteError(f"IdentityMap needs dx == dy, got {X.shape[1]} and {Y.shape[1]}; use "
                            "ProcrustesMap or RidgeMap for different widths")
        self.dx_ = self.dy_ = X.shape[1]
        self.fitted_ = True
        return self

    def transform(self, X) -> torch.Tensor:
        self._check_in(X)
        return X.clone()


# class name -> class, for load_map; filled in mechdiff/analyses/maps/__init__.py
MAP_CLASSES: dict = {}
