"""RaterChannel: targets (one address or several, balanced round-robin), options, the bearer token on every
call, the aio channel the serving bench builds from it, and the remote selector over several servers."""

from __future__ import annotations

import asyncio
import json

import grpc
import pytest
import torch
from support.server import ServerThread, make_repository

from noiserater.client.channel import ChannelError, RaterChannel, grpc_target, split_target
from noiserater.client.selector import NoiseSelector
from noiserater.core.v1 import rater_service_pb2 as pb
from noiserater.core.v1 import rater_service_pb2_grpc as pb_grpc
from noiserater.server.config import ServerConfig

TOKEN = "channel-token"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, rater_onnx):
    """Two servers told apart by their default version of `digits`: 1 on the first, 2 on the second. Both
    want the token on every call."""
    root = tmp_path_factory.mktemp("servers")
    (root / "token").write_text(TOKEN)
    configs = [ServerConfig(repository=make_repository(root / f"repo{n}", {"digits": [rater_onnx] * n}),
                            host="127.0.0.1", port=0, max_delay_ms=1.0, auth_token_file=str(root / "token"),
                            auth_all=True) for n in (1, 2)]
    with ServerThread(configs[0]) as first, ServerThread(configs[1]) as second:
        yield first, second


def test_targets():
    assert split_target(" a:1, b:2 ") == ["a:1", "b:2"] == split_target(["a:1", " b:2"])
    assert split_target("ipv4:10.0.0.1:5,10.0.0.2:5") == ["ipv4:10.0.0.1:5,10.0.0.2:5"]  # gRPC's own syntax
    assert grpc_target(["dns:///raters:50051"]) == "dns:///raters:50051"
    assert grpc_target(["127.0.0.1:1", "10.0.0.2:2"]) == "ipv4:127.0.0.1:1,10.0.0.2:2"
    assert grpc_target(["[::1]:1", "[::2]:2"]) == "ipv6:[::1]:1,[::2]:2"
    assert grpc_target(["localhost:7", "127.0.0.2:8"]) == "ipv4:127.0.0.1:7,127.0.0.2:8"
    for bad, message in ((" , ", "no address"), (["127.0.0.1", "127.0.0.2:2"], "not HOST:PORT"),
                         (["127.0.0.1:1", "[::1]:2"], "mixes IPv4 and IPv6")):
        with pytest.raises(ChannelError, match=message):
            grpc_target(split_target(bad))


def test_options_retries_balancing_and_token():
    one = RaterChannel("localhost:1", token="abc", max_message_bytes=1000)
    options = dict(one.options)
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 1000
    config = json.loads(options["grpc.service_config"])
    retry = config["methodConfig"][0]["retryPolicy"]
    assert retry["maxAttempts"] == 4 and retry["retryableStatusCodes"] == ["UNAVAILABLE"]
    assert "loadBalancingConfig" not in config and options["grpc.enable_retries"] == 1
    assert one.metadata == (("authorization", "Bearer abc"),) and one.timeout_s == 30.0

    several = RaterChannel("127.0.0.1:1,127.0.0.1:2", max_attempts=1)
    config = json.loads(dict(several.options)["grpc.service_config"])
    assert config == {"loadBalancingConfig": [{"round_robin": {}}]} and several.metadata is None
    plain = dict(RaterChannel("localhost:1", max_attempts=1).options)
    assert "grpc.service_config" not in plain and "grpc.enable_retries" not in plain


def test_several_servers_are_balanced_round_robin_with_the_token(servers):
    first, second = servers
    with RaterChannel(f"{first.target},{second.target}", token=TOKEN, timeout_s=10) as channel:
        defaults = {channel.call("ListModels", pb.ListModelsRequest()).models[0].default_version for _ in range(40)}
    assert defaults == {1, 2}
    with RaterChannel(first.target, timeout_s=10) as without_token, pytest.raises(grpc.RpcError) as err:
        without_token.call("ListModels", pb.ListModelsRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_aio_channel_has_the_same_target_options_and_token(servers):
    channel = RaterChannel([servers[0].target, servers[1].target], token=TOKEN)

    async def list_defaults() -> set[int]:
        async with channel.aio_channel(("grpc.channel_id", 1)) as aio:
            stub = pb_grpc.RaterServiceStub(aio)
            replies = [await stub.ListModels(pb.ListModelsRequest(), timeout=10, metadata=channel.metadata)
                       for _ in range(40)]
        return {reply.models[0].default_version for reply in replies}

    assert asyncio.run(list_defaults()) == {1, 2}


def test_remote_selector_over_several_servers(servers):
    selector = NoiseSelector.remote([s.target for s in servers], model="digits", token=TOKEN, transport="unary",
                                    timeout_s=10)
    gen = torch.Generator().manual_seed(0)
    versions = set()
    for _ in range(40):
        x0, t = torch.rand(3, 64, generator=gen), torch.randint(0, 100, (3,), generator=gen)
        assert selector.select(x0, t).shape == x0.shape
        versions.add(selector.model_version)
    selector.close()
    assert versions == {1, 2} and selector.counters["fallback_gaussian"] == 0


@pytest.mark.parametrize("target", ["commas", "dns"])
def test_remote_selector_takes_commas_or_a_dns_name(servers, target):
    """Besides a list (above): one comma-separated string, balanced over its addresses; a gRPC `dns:///` name,
    here resolving to the first server only."""
    first, second = servers
    given = f"{first.target},{second.target}" if target == "commas" else f"dns:///localhost:{first.port}"
    with NoiseSelector.remote(given, model="digits", token=TOKEN, transport="unary", timeout_s=10,
                              round_robin=target == "dns") as selector:
        gen = torch.Generator().manual_seed(0)
        versions = set()
        for _ in range(20):
            x0, t = torch.rand(3, 64, generator=gen), torch.randint(0, 100, (3,), generator=gen)
            assert selector.select(x0, t).shape == x0.shape
            versions.add(selector.model_version)
        assert selector.counters["served"] == 20 and selector.counters["fallback_gaussian"] == 0
    assert versions == ({1, 2} if target == "commas" else {1})
