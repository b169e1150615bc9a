"""A model's batching settings and version policy: the server's flags, overridden by
`<repository>/<name>/config.pbtxt` in Triton's own format (protobuf text format of the ModelConfig subset in
proto/inference/model_config.proto).

The fields read, and what they set for every version of the model (a field left out keeps the flag):

    max_batch_size: 64           the most (x0, t, eps) triples one onnxruntime run takes (--max-batch);
                                 0 switches batching off. Triton counts the rows of a batch; a rater's
                                 rows are its triples, which are what the batcher merges and splits.
    dynamic_batching {           present: replaces --max-delay-ms (a delay left out is 0, as in Triton)
      max_queue_delay_microseconds: 500
      preferred_batch_size: [ 32, 64 ]    run sizes (triples) that go at once, without waiting out the delay
    }
    instance_group [ { count: 2 } ]       runs in flight at once (--instances): the groups' counts summed,
                                          1 for a group without one
    version_policy { latest { num_versions: 2 } }   which versions on disk are served: the 2 highest-numbered;
                   { specific { versions: [1, 3] } }  just these; { all {} } every one. Left out: all (Triton's
                                          default is latest 1; rater-server has always served every version)

`name`, `platform` and `backend` may be given, but must be the model's folder name, onnxruntime_onnx and
onnxruntime. Any other field is an error: the signature comes from the ONNX file and the device from
--device. A config that cannot be used is a one-line ModelConfigError; the model is skipped at load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc
from google.protobuf import text_format

from noiserater.core import repository
from noiserater.core.inference import model_config_pb2 as config_pb
from noiserater.server.config import ServerConfig
from noiserater.server.rpc import RpcError

CONFIG_FILE = "config.pbtxt"
PLATFORM, BACKEND = "onnxruntime_onnx", "onnxruntime"
FIELDS = ("name", "platform", "backend", "max_batch_size", "dynamic_batching", "instance_group", "version_policy")


class ModelConfigError(RpcError, ValueError):
    """A model's config.pbtxt that cannot be used (a deploy into that model fails with FAILED_PRECONDITION)."""

    grpc_status = grpc.StatusCode.FAILED_PRECONDITION


@dataclass(frozen=True)
class Batching:
    """How one model's requests are batched."""

    max_batch: int  # triples per onnxruntime run; 0: batching off, one run per request
    max_delay_ms: float
    instances: int  # runs in flight at once (with batching on)
    preferred: tuple[int, ...] = ()  # run sizes that go without waiting out the delay

    @classmethod
    def from_flags(cls, config: ServerConfig) -> Batching:
        return cls(config.max_batch, config.max_delay_ms, config.instances)


@dataclass(frozen=True)
class VersionPolicy:
    """Which of a model's versions on disk are served (Triton's ModelVersionPolicy)."""

    kind: str = "all"  # "all", "latest" or "specific"
    num_versions: int = 0  # latest: how many
    versions: tuple[int, ...] = ()  # specific: which

    def select(self, versions: list[int] | set[int]) -> list[int]:
        """The versions (ascending) of `versions` that the policy serves."""
        ordered = sorted(versions)
        if self.kind == "latest":
            return ordered[-self.num_versions:]
        if self.kind == "specific":
            return [v for v in ordered if v in self.versions]
        return ordered

    def to_proto(self) -> config_pb.ModelVersionPolicy:
        policy = config_pb.ModelVersionPolicy
        if self.kind == "latest":
            return policy(latest=policy.Latest(num_versions=self.num_versions))
        if self.kind == "specific":
            return policy(specific=policy.Specific(versions=self.versions))
        return policy(all=policy.All())

    def __str__(self) -> str:
        if self.kind == "latest":
            return f"latest {self.num_versions}"
        if self.kind == "specific":
            return f"specific {list(self.versions)}"
        return "all"


@dataclass(frozen=True)
class ModelSettings:
    """What a model's config.pbtxt sets (over the server's flags)."""

    batching: Batching
    policy: VersionPolicy = VersionPolicy()


def read_settings(model_dir: Path, defaults: Batching) -> ModelSettings:
    """The model's batching (`defaults` with what its config.pbtxt, if any, sets) and version policy."""
    path = model_dir / CONFIG_FILE
    if not path.exists():
        return ModelSettings(defaults)
    try:
        parsed = text_format.Parse(path.read_text(), config_pb.ModelConfig())
    except (OSError, UnicodeDecodeError, text_format.ParseError) as exc:
        raise ModelConfigError(f"{CONFIG_FILE}: {exc}") from None
    return ModelSettings(batching_of(parsed, model_dir.name, defaults), policy_of(parsed))


def policy_of(parsed: config_pb.ModelConfig) -> VersionPolicy:
    if not parsed.HasField("version_policy"):
        return VersionPolicy()
    policy = parsed.version_policy
    choice = policy.WhichOneof("policy_choice")
    if choice == "latest":
        if policy.latest.num_versions < 1:
            raise _fail(f"version_policy.latest.num_versions: must be >= 1, got {policy.latest.num_versions}")
        return VersionPolicy("latest", num_versions=policy.latest.num_versions)
    if choice == "specific":
        versions = tuple(sorted(set(policy.specific.versions)))
        if not versions or versions[0] < 1 or versions[-1] > repository.MAX_VERSION:
            raise _fail(f"version_policy.specific.versions: give one or more versions in 1..{repository.MAX_VERSION}")
        return VersionPolicy("specific", versions=versions)
    return VersionPolicy()  # all {} (or an empty version_policy {})


def _fail(message: str) -> ModelConfigError:
    return ModelConfigError(f"{CONFIG_FILE}: {message}")


def batching_of(parsed: config_pb.ModelConfig, name: str, defaults: Batching) -> Batching:
    unsupported = [field.name for field, _ in parsed.ListFields() if field.name not in FIELDS]
    if unsupported:
        raise _fail(f"{', '.join(unsupported)}: not read by rater-server (it reads {', '.join(FIELDS)})")
    for field, expected in (("name", name), ("platform", PLATFORM), ("backend", BACKEND)):
        given = getattr(parsed, field)
        if given and given != expected:
            raise _fail(f"{field}: {given!r} is not {expected!r}")
    max_batch = parsed.max_batch_size if parsed.HasField("max_batch_size") else defaults.max_batch
    if max_batch < 0:
        raise _fail(f"max_batch_size: must be >= 0 (0 = batching off), got {max_batch}")
    max_delay_ms, preferred = defaults.max_delay_ms, defaults.preferred
    if parsed.HasField("dynamic_batching"):
        max_delay_ms = parsed.dynamic_batching.max_queue_delay_microseconds / 1000.0
        preferred = tuple(sorted(set(parsed.dynamic_batching.preferred_batch_size)))
        outside = [size for size in preferred if size < 1 or (max_batch and size > max_batch)]
        if outside:
            raise _fail(f"dynamic_batching.preferred_batch_size: {outside[0]} is not within 1..max_batch_size "
                        f"({max_batch})")
    instances = defaults.instances
    if parsed.instance_group:
        for group in parsed.instance_group:
            if group.kind != config_pb.ModelInstanceGroup.KIND_AUTO:
                raise _fail("instance_group.kind: the device is the server's --device; leave kind out")
            if group.count < 0:
                raise _fail(f"instance_group.count: must be >= 0, got {group.count}")
        instances = sum(group.count or 1 for group in parsed.instance_group)
    return Batching(max_batch, max_delay_ms, instances, preferred)
