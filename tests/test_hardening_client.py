"""Hardening, the remote selector: falling back to plain Gaussian noise is right when the rater server is down,
and wrong when the server is up and says the job is misconfigured (unknown model, wrong token, TLS mismatch):
that must raise, or a training run silently trains without selection. During an outage a step must not pay the
whole retry budget every time. Only the public client API (NoiseSelector.remote) against in-process servers."""

from __future__ import annotations

import shutil
import time

import pytest
import torch
from support.hostile import TOKEN, plain_rater_bytes, self_signed_cert, write_repository
from support.server import ServerThread

from noiserater.client.selector import NoiseSelector
from noiserater.server.config import ServerConfig


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(8, 64, generator=gen) * 2 - 1, torch.randint(0, 100, (8,), generator=gen)


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return write_repository(tmp_path_factory.mktemp("client") / "repo", {"digits": plain_rater_bytes()})


@pytest.fixture(scope="module")
def server(repo):
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")) as running:
        yield running


@pytest.fixture(scope="module")
def locked_server(repo, tmp_path_factory):
    token = tmp_path_factory.mktemp("token") / "token"
    token.write_text(TOKEN + "\n")
    config = ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu", auth_token_file=str(token),
                          auth_all=True)
    with ServerThread(config) as running:
        yield running


def first_selection(**remote_kwargs) -> tuple[BaseException | None, dict[str, int]]:
    """(what constructing a remote selector and its first select raised, or None; its counters)."""
    selector = None
    try:
        selector = NoiseSelector.remote(num_candidates=4, timeout_s=2, **remote_kwargs)
        selector.select(*batch())
    except Exception as exc:  # any exception type will do: the point is that it is not silent
        return exc, selector.counters if selector is not None else {}
    finally:
        if selector is not None:
            selector.close()
    return None, selector.counters


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_unknown_model_raises(server, transport):
    """A remote selector naming a model the (running) server does not have raises at construction or at its
    first select instead of returning plain Gaussian noise."""
    raised, counters = first_selection(target=server.target, model="typo", transport=transport)
    assert raised is not None, f"no exception; counters {counters}"


@pytest.mark.parametrize("transport", ["stream", "unary"])
def test_wrong_token_raises(locked_server, transport):
    """A remote selector with a wrong token, against a server with --auth-all, raises at construction or at its
    first select instead of returning plain Gaussian noise."""
    raised, counters = first_selection(target=locked_server.target, model="digits", token="wrong-token",
                                       transport=transport)
    assert raised is not None, f"no exception; counters {counters}"


def test_tls_client_against_a_plaintext_server_raises(server, tmp_path):
    """A remote selector configured for TLS (a root certificate) against a plaintext server, whose handshake
    fails, raises at construction or at its first select instead of returning plain Gaussian noise."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, _ = self_signed_cert(tmp_path)
    raised, counters = first_selection(target=server.target, model="digits", tls_root_cert=cert.read_bytes())
    assert raised is not None, f"no exception; counters {counters}"


@pytest.fixture
def outage(repo):
    """A remote selector that has been served once, whose server has then stopped."""
    running = ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu")).start()
    selector = NoiseSelector.remote(running.target, model="digits", num_candidates=4, timeout_s=2)
    try:
        selector.select(*batch())
        assert selector.counters["fallback_gaussian"] == 0
    finally:
        running.stop(grace=0)
    yield selector
    selector.close()


def test_outage_falls_back_to_gaussian_noise(outage):
    """Once the server is gone, select still returns noise of x0's shape (plain Gaussian: no fallback model is
    configured) and counts the fallback."""
    x0, t = batch(1)
    eps = outage.select(x0, t)
    assert eps.shape == x0.shape and torch.isfinite(eps).all()
    assert outage.counters["fallback_gaussian"] == 1 and outage.counters["selections"] == 2


def test_outage_does_not_cost_every_step_the_retry_budget(outage):
    """During an outage, after the first failures (each the retry budget) the selector stops trying the server
    for a while: the circuit breaker opens within a few selects, and then 20 selects in a row make no RPC and
    take under 1 s in all (0.05 s each on average; a retry budget is about 0.35 s)."""
    x0, t = batch(2)
    for _ in range(5):
        outage.select(x0, t)
        if outage.counters["breaker_open"]:
            break
    assert outage.counters["breaker_open"] == 1, outage.counters
    requests = outage.counters["requests"]
    started = time.monotonic()
    done = 0
    while done < 20 and time.monotonic() - started < 1.0:
        outage.select(x0, t)
        done += 1
    elapsed = time.monotonic() - started
    assert done == 20 and elapsed < 1.0, f"{done} selects in {elapsed:.2f}s"
    assert outage.counters["requests"] == requests and outage.counters["fallback_gaussian"] >= 20
