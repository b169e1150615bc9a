"""rater-server's options: every ServerConfig field is a `serve` flag with a RATER_SERVER_* fallback, and
out-of-range values are one-line errors naming the flag."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from noiserater.server.config import ConfigError, ServerConfig, add_serve_arguments, config_from_args


def parse(argv: list[str]) -> ServerConfig:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return config_from_args(parser.parse_args(argv))


def test_every_field_is_a_flag_and_the_defaults_are_the_dataclass_defaults(tmp_path):
    config = parse(["--repository", str(tmp_path)])
    assert config == ServerConfig(repository=tmp_path)
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    flags = {action.dest for action in parser._actions} - {"help"}
    assert flags == {field.name for field in dataclasses.fields(ServerConfig)}


def test_environment_fallback_and_the_command_line_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("RATER_SERVER_REPOSITORY", str(tmp_path))
    monkeypatch.setenv("RATER_SERVER_MAX_DELAY_MS", "2.5")
    monkeypatch.setenv("RATER_SERVER_INSTANCES", "3")
    monkeypatch.setenv("RATER_SERVER_DEVICE", "cpu")
    monkeypatch.setenv("RATER_SERVER_REPOSITORY_POLL_S", "5")
    config = parse(["--instances", "2"])
    assert config.repository == Path(tmp_path) and config.max_delay_ms == 2.5 and config.device == "cpu"
    assert config.repository_poll_s == 5.0
    assert config.instances == 2 and isinstance(config.max_delay_ms, float)
    assert not config.auth_all
    monkeypatch.setenv("RATER_SERVER_AUTH_ALL", "yes")
    with pytest.raises(ConfigError, match="^--auth-all needs --auth-token-file$"):
        parse([])


@pytest.mark.parametrize("argv, message", [
    (["--port", "70000"], "--port: value 70000 is out of range"),
    (["--max-batch", "-1"], "--max-batch: value -1 is out of range"),
    (["--max-queue", "0"], "--max-queue: value 0 is out of range"),
    (["--switch-interval-ms", "0"], "--switch-interval-ms: value 0.0 is out of range"),
    (["--repository-poll-s", "-1"], "--repository-poll-s: value -1.0 is out of range"),
    (["--tls-cert", "a.pem"], "--tls-cert and --tls-key go together"),
    (["--auth-token-file", "missing"], "--auth-token-file: no such file missing"),
])
def test_bad_values_are_named(tmp_path, argv, message):
    with pytest.raises(ConfigError) as err:
        parse(["--repository", str(tmp_path), *argv])
    assert str(err.value) == message


def test_describe_redacts_the_redis_password(tmp_path):
    text = parse(["--repository", str(tmp_path), "--redis-url", "redis://user:secret@host:6379/0"]).describe()
    assert "redis_url=redis://user:***@host:6379/0" in text and "secret" not in text
    assert text.startswith(f"repository={tmp_path} host=0.0.0.0 port=50051 ")
