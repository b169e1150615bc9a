"""The repository watch inside one server, each scan driven by the test (the watch's own timer is an hour):
it acts on what changed in the folder, never on what an admin call changed in the server; a model file still
being written is not read; a removed model is unloaded."""

from __future__ import annotations

import shutil

import pytest
from support.server import ServerThread, make_repository

from noiserater.core import repository
from noiserater.server import watch
from noiserater.server.config import ServerConfig


@pytest.fixture
def server(tmp_path, rater_onnx):
    repo = make_repository(tmp_path / "repo", {"digits": [rater_onnx], "other": [rater_onnx]})
    with ServerThread(ServerConfig(repository=repo, host="127.0.0.1", port=0, device="cpu",
                                   repository_poll_s=3600)) as running:
        yield running


def loaded(server) -> dict[str, list[int]]:
    return {m.name: [v.version for v in m.versions] for m in server.server.registry.list()}


def poll(server) -> None:
    server.call(server.server.watcher.poll())


def test_an_admin_unload_is_not_undone_and_a_removed_model_is_unloaded(server, rater_onnx):
    registry = server.server.registry
    server.call(registry.unload("digits", 1))
    repository.write_version(server.config.repository, "digits", rater_onnx.read_bytes(), 2)
    poll(server)
    assert loaded(server) == {"digits": [2], "other": [1]}  # version 1 stays unloaded: its files did not change
    shutil.rmtree(server.config.repository / "other")
    poll(server)
    assert loaded(server) == {"digits": [2]}
    poll(server)
    assert loaded(server) == {"digits": [2]} and server.server.metrics.repository_refused._value.get() == 0
    # A repository folder that is gone (a volume not mounted) is an error of the scan, not an empty repository.
    root = server.config.repository
    root.rename(root.with_name("elsewhere"))
    with pytest.raises(OSError, match="not a folder"):
        poll(server)
    assert loaded(server) == {"digits": [2]}


def test_a_model_file_still_being_written_waits_for_the_next_scan(server, rater_onnx, monkeypatch):
    """Copied in place (not renamed in, as the repository's own writers do): the scan finds the file growing
    between its two looks and leaves it for the next scan, which finds it complete."""
    data = rater_onnx.read_bytes()
    target = server.config.repository / "digits" / "2" / repository.MODEL_FILE
    target.parent.mkdir()
    target.write_bytes(data[: len(data) // 2])
    scans = []
    scan = watch.scan

    def writer_still_writing(root):
        scans.append(root)
        if len(scans) == 1:  # between the scan's two looks the writer adds the rest
            found = scan(root)
            with open(target, "ab") as handle:
                handle.write(data[len(data) // 2:])
            return found
        return scan(root)

    monkeypatch.setattr(watch, "scan", writer_still_writing)
    poll(server)
    assert len(scans) == 2 and loaded(server)["digits"] == [1]
    assert server.server.metrics.repository_refused._value.get() == 0
    poll(server)
    assert loaded(server)["digits"] == [1, 2] and server.server.metrics.repository_refused._value.get() == 0


def test_a_version_this_server_deployed_is_not_validated_again(server, rater_onnx_v2, monkeypatch):
    """DeployModel writes the version into the repository; the next scan finds it there, loaded already, and
    leaves it alone: one validation, no reload."""
    from noiserater.server import validate

    checks = []
    check = validate.ValidationSession.check

    async def counted(self, data):
        checks.append(len(data))
        return await check(self, data)

    monkeypatch.setattr(validate.ValidationSession, "check", counted)
    registry = server.server.registry
    deployed = server.call(registry.deploy("digits", rater_onnx_v2.read_bytes()))
    poll(server)
    poll(server)
    assert deployed.version == 2 and loaded(server)["digits"] == [1, 2] and len(checks) == 1
    assert registry.get("digits", 2) is deployed  # the very version the deploy activated, not a reload
