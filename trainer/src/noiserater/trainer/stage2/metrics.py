"""Stage-2 metrics: the held-out denoising loss under Gaussian noise at fixed seeds, and sample quality.

- `FixedEval`: held-out items paired with fixed timesteps and fixed *Gaussian* noises (seeded), so every
  method and every evaluation step is measured on the very same (x0, t, eps) triples. This is the real
  objective: sampling starts from N(0, I), whatever noise a method trained on.
- `FeatureClassifier`: a small MLP classifier trained in-project on the training split (when the dataset has
  labels); its penultimate activations are the features of the Fréchet distance. Its test accuracy and
  the metric's floor (held-out real data vs training data) are reported beside the metric.
- `frechet_distance`, `sliced_wasserstein`: the two sample-quality distances.
- `SampleQuality`: the reference statistics of one dataset; `measure` compares samples with the training split
  (the ancestral-sampling metrics `frechet` / `swd`), `measure_heldout` with the held-out split (the few-step
  sweep's `frechet@NFE` / `swd@NFE`, whose floor is the training split against the held-out one), and
  `nearest_train_distance` is the memorisation check's distance.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from noiserater.trainer.substrate.data import DataSplits
from noiserater.trainer.substrate.diffusion import Schedule, per_sample_loss

EVAL_SEED = 20240917
FEATURE_SEED = 7
SWD_PROJECTIONS = 256


class FixedEval:
    """Held-out items x `repeats` fixed (t, eps) pairs with Gaussian eps; `loss(denoiser)` is their mean."""

    def __init__(self, data: torch.Tensor, schedule: Schedule, repeats: int = 8, max_items: int = 2048,
                 seed: int = EVAL_SEED, chunk: int = 4096):
        gen = torch.Generator().manual_seed(seed)
        data = data[:max_items]
        self.x0 = data.repeat(repeats, *([1] * (data.dim() - 1)))
        self.t = torch.randint(0, schedule.num_timesteps, (self.x0.shape[0],), generator=gen)
        self.eps = torch.randn(self.x0.shape, generator=gen)
        self.schedule = schedule
        self.chunk = chunk

    @torch.no_grad()
    def per_sample(self, denoiser: nn.Module) -> torch.Tensor:
        was_training = denoiser.training
        denoiser.eval()
        device = next(denoiser.parameters()).device
        out = []
        for i in range(0, self.x0.shape[0], self.chunk):
            sl = slice(i, i + self.chunk)
            out.append(per_sample_loss(denoiser, self.schedule, self.x0[sl].to(device), self.t[sl].to(device),
                                       self.eps[sl].to(device)).cpu())
        denoiser.train(was_training)
        return torch.cat(out)

    def loss(self, denoiser: nn.Module) -> float:
        return float(self.per_sample(denoiser).mean())


class _ClassifierNet(nn.Module):
    def __init__(self, dim: int, classes: int, hidden: int = 256, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, features), nn.SiLU())
        self.head = nn.Linear(features, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.flatten(1)))


@dataclass
class FeatureClassifier:
    """The Fréchet feature extractor: a classifier trained on the training split, frozen."""

    net: _ClassifierNet
    test_accuracy: float

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> np.ndarray:
        self.net.eval()
        return self.net.body(x.flatten(1).float().cpu()).double().numpy()


_CLASSIFIERS: dict[str, FeatureClassifier] = {}


def _cache_path(key: str) -> Path:
    root = Path(os.environ.get("NOISERATER_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                           Path.home() / ".cache") / "noiserater")
    return root / f"feature-classifier-{key}.pt"


def train_classifier(train_x: torch.Tensor, train_y: torch.Tensor, test_x: torch.Tensor, test_y: torch.Tensor,
                     epochs: int = 30, seed: int = FEATURE_SEED) -> FeatureClassifier:
    """Train the feature classifier deterministically (light input noise for robustness); cached in memory
    and on disk (keyed by a hash of the data and the settings), since every run of a benchmark shares it."""
    digest = hashlib.sha256()
    for tensor in (train_x, train_y, test_x, test_y):
        digest.update(np.ascontiguousarray(tensor.numpy()).tobytes())
    digest.update(f"{epochs}:{seed}:v1".encode())
    key = digest.hexdigest()[:16]
    if key in _CLASSIFIERS:
        return _CLASSIFIERS[key]
    classes = int(max(train_y.max(), test_y.max())) + 1
    dim = math.prod(train_x.shape[1:])
    path = _cache_path(key)
    if path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            net = _ClassifierNet(dim, classes)
            net.load_state_dict(blob["state_dict"])
            net.eval()
            _CLASSIFIERS[key] = FeatureClassifier(net, float(blob["test_accuracy"]))
            return _CLASSIFIERS[key]
        except Exception:  # a corrupt or stale cache entry: retrain
            pass
    gen = torch.Generator().manual_seed(seed)
    torch_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    net = _ClassifierNet(dim, classes)
    torch.random.set_rng_state(torch_state)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3, weight_decay=1e-4)
    x = train_x.flatten(1).float()
    n = x.shape[0]
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, 128):
            idx = order[i:i + 128]
            xb = x[idx] + 0.1 * torch.randn(x[idx].shape, generator=gen)
            loss = nn.functional.cross_entropy(net(xb), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        accuracy = float((net(test_x.flatten(1).float()).argmax(1) == test_y).float().mean())
    clf = FeatureClassifier(net, accuracy)
    _CLASSIFIERS[key] = clf
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        torch.save({"state_dict": net.state_dict(), "test_accuracy": accuracy}, tmp)
        tmp.replace(path)
    except OSError:
        pass
    return clf


def frechet_from_features(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to feature sets a [N, F] and b [M, F]."""
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")  # a diverged model's samples
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr sqrt(A B) = sum of the square roots of the eigenvalues of A^1/2 B A^1/2, which is symmetric positive
    # semi-definite: stable also for the rank-deficient covariances of fewer samples than features.
    w, v = np.linalg.eigh(cov_a)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    middle = root_a @ cov_b @ root_a
    trace_covmean = float(np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum())
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * trace_covmean)


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: int = SWD_PROJECTIONS,
                       seed: int = EVAL_SEED) -> float:
    """Sliced Wasserstein-2 distance between point sets a [N, ...] and b [M, ...] (fixed random directions;
    unequal sizes compared at common quantiles)."""
    gen = torch.Generator().manual_seed(seed)
    a2, b2 = a.flatten(1).double().cpu(), b.flatten(1).double().cpu()
    dirs = torch.randn(a2.shape[1], projections, generator=gen, dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    pa, pb = (a2 @ dirs).sort(0).values, (b2 @ dirs).sort(0).values
    n = min(pa.shape[0], pb.shape[0])
    q = (torch.arange(n, dtype=torch.float64) + 0.5) / n

    def at_quantiles(p: torch.Tensor) -> torch.Tensor:
        pos = q * p.shape[0] - 0.5
        lo = pos.floor().clamp(0, p.shape[0] - 1).long()
        hi = (lo + 1).clamp(max=p.shape[0] - 1)
        w = (pos - lo.double()).clamp(0, 1)[:, None]
        return p[lo] * (1 - w) + p[hi] * w

    return float((at_quantiles(pa) - at_quantiles(pb)).pow(2).mean().sqrt())


class SampleQuality:
    """Reference statistics for one dataset: Fréchet features of the training split (classifier features
    when the dataset has labels, else the raw data, randomly projected to <= 128 dims) and its floor."""

    def __init__(self, data: DataSplits):
        train, heldout = data.train, torch.cat([data.val, data.test])
        self.train = train
        self.range = (float(train.min()), float(train.max()))
        self.classifier: FeatureClassifier | None = None
        self.projection: torch.Tensor | None = None
        if "train" in data.labels and "test" in data.labels:
            self.classifier = train_classifier(train, data.labels["train"], data.test, data.labels["test"])
        else:
            dim = math.prod(train.shape[1:])
            if dim > 128:
                gen = torch.Generator().manual_seed(FEATURE_SEED)
                self.projection = torch.randn(dim, 128, generator=gen) / math.sqrt(128)
        self.heldout = heldout
        self.reference = self.features(train)
        self.floor_frechet = frechet_from_features(self.features(heldout), self.reference)
        self.floor_swd = sliced_wasserstein(heldout, train)
        self.heldout_count = int(heldout.shape[0])
        self.heldout_reference = self.features(heldout)
        # The held-out comparison's floor: the whole training split against the held-out split.
        self.floor_frechet_heldout = frechet_from_features(self.reference, self.heldout_reference)
        self.floor_swd_heldout = sliced_wasserstein(train, heldout)
        self.heldout_nearest_train = float(self.nearest_train_distance(heldout).mean())

    @property
    def feature_kind(self) -> str:
        return "classifier" if self.classifier is not None else "raw"

    def features(self, x: torch.Tensor) -> np.ndarray:
        if self.classifier is not None:
            return self.classifier.features(x)
        flat = x.flatten(1).double().cpu()
        if self.projection is not None:
            flat = flat @ self.projection.double()
        return flat.numpy()

    def measure(self, samples: torch.Tensor) -> dict[str, float]:
        samples = samples.clamp(*self.range)  # as samplers clip to the data range
        return {
            "frechet": frechet_from_features(self.features(samples), self.reference),
            "swd": sliced_wasserstein(samples, self.train),
        }

    def measure_heldout(self, samples: torch.Tensor) -> dict[str, float]:
        """frechet / swd of samples (clipped to the data range) against the held-out split."""
        samples = samples.clamp(*self.range)
        return {
            "frechet": frechet_from_features(self.features(samples), self.heldout_reference),
            "swd": sliced_wasserstein(samples, self.heldout),
        }

    def nearest_train_distance(self, x: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
        """[N] RMS-per-dimension distance from each item of x to its nearest training item."""
        flat_train = self.train.flatten(1).double()
        flat = x.clamp(*self.range).flatten(1).double()
        out = [torch.cdist(flat[i:i + chunk], flat_train).min(dim=1).values for i in range(0, len(flat), chunk)]
        return torch.cat(out) / math.sqrt(flat.shape[1])
