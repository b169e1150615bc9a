"""NoiseRater's client for training jobs: `NoiseSelector` (in-process, remote or a peer method), its
transports and `RaterChannel`, the one channel builder every caller of a rater server uses.

Importing this package imports no torch: each name is loaded on first use, and the channel and the
admin calls need only grpc and numpy.
"""

from __future__ import annotations

import importlib

_HOMES = {"NoiseSelector": "selector", "SelectorError": "backends", "RaterChannel": "channel"}
__all__ = list(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(f"noiserater.client.{_HOMES[name]}"), name)
    raise AttributeError(name)
