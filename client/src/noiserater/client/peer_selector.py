"""PeerSelector: a peer noise source behind NoiseSelector's interface (`NoiseSelector.peer(name)`), so a
training job switches between the rater and a peer method without changing its loop: the same `select`,
`prefetch`, `counters`, `last_stats` and `close`, and the peer's own `loss_weights` (min-snr's)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future

import torch

from noiserater.client.selector import NoiseSelector, SelectorError, _as_timesteps, _check_batch, _like
from noiserater.client.sources import NoiseSource


class PeerSelector(NoiseSelector):
    """Each call's noise is `source.sample(x0, t, step)`, step being the selector's call count."""

    def __init__(self, source: NoiseSource, num_candidates: int = 8, seed: int | None = None):
        super().__init__(None, num_candidates, seed=seed)
        self.source = source

    def _start(self, x0: torch.Tensor, t: torch.Tensor, num_candidates: int | None) -> Callable[[], torch.Tensor]:
        t = _as_timesteps(t, x0)
        _check_batch(x0, t)
        if num_candidates is not None and num_candidates != self.num_candidates:
            raise SelectorError(f"num_candidates: a peer source draws its own {self.num_candidates} candidates; "
                                f"it cannot be changed per call (got {num_candidates})")
        step = self.calls
        self.calls += 1
        return lambda: self.source.sample(x0, t, step)

    def _discard(self, prefetched: Future) -> None:
        """Wait for it: the source draws from its generator while it runs, and the draws must stay in call
        order for the noise to depend on the seed alone."""
        prefetched.exception()

    def _finish(self, x0: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        return self._count(_like(result, x0), x0)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor | None:
        return self.source.loss_weights(t)

    @property
    def model_version(self) -> int:
        """0: no model answers a peer."""
        return 0
