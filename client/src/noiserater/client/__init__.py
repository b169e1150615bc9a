"""NoiseRater's client for training jobs: `NoiseSelector` (in-process or remote), its transports and the
one channel builder every caller of a rater server uses.

Importing this package imports no torch: `NoiseSelector` is loaded on first use, and the channel and
admin calls need only grpc and numpy.
"""

from __future__ import annotations

__all__ = ["NoiseSelector", "SelectorError"]


def __getattr__(name: str):
    if name in __all__:
        from noiserater.client import selector

        return getattr(selector, name)
    raise AttributeError(name)
