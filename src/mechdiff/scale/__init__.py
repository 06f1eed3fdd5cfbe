"""Scaling past one GPU and one pair.

- :mod:`mechdiff.scale.devices`: one model over the GPUs of a host (accelerate ``device_map`` /
  ``max_memory``: validation, parsing of the CLI forms, the device a model takes its inputs on).
- :mod:`mechdiff.scale.distributed`: data parallel capture / patching for one study under
  ``torchrun`` (prompts split over ranks, results gathered on rank 0).
- many pairs as Ray tasks (``mechdiff sweep``) live in :mod:`mechdiff.experiments.sweep` (stage glue).

Nothing here imports Ray at import time: Ray is needed only by ``sweep``.
"""
