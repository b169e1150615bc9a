"""The on-disk model repository layout, `<repo>/<name>/<version>/model.onnx`, shared by the server
(which loads and writes it) and `nrctl deploy --repository` (which writes it without a server).

Model names are validated here so that no name can escape the repository. Versions are integers from 1
to MAX_VERSION (2^53 - 1, the largest integer every JSON reader holds exactly), written in decimal
without leading zeros; other folders are not versions.

A version is written into a temporary folder `<name>/.upload-*` (locked while it is written), fsynced and
renamed into place in one step, so a reader sees all of it or none; a writer killed half-way leaves only
its temporary folder, which `remove_stale_uploads` deletes at the next start.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import tempfile
from pathlib import Path

from noiserater.core.text import clip

MODEL_FILE = "model.onnx"
MAX_VERSION = 2**53 - 1
UPLOAD_PREFIX = ".upload-"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always fullmatch: `$` would let a final "\n" by
_VERSION = re.compile(r"[1-9][0-9]*")


class RepositoryError(ValueError):
    pass


def check_model_name(name: str) -> str:
    """A name is 1-64 chars of letters, digits, '_', '-', '.', starting with a letter or digit, not '..'."""
    if not _NAME.fullmatch(name or "") or ".." in name:
        raise RepositoryError(
            f"name: invalid model name {clip(name)} (1-64 letters, digits, '_', '-', '.'; starts with a letter or "
            "digit)"
        )
    return name


def check_version(version: int) -> int:
    if not 1 <= version <= MAX_VERSION:
        raise RepositoryError(f"version: versions are integers from 1 to {MAX_VERSION}, got {str(version)[:24]}")
    return version


def version_dir(repository: Path, name: str, version: int) -> Path:
    return Path(repository) / check_model_name(name) / str(check_version(version))


def versions_on_disk(repository: Path, name: str, skipped: list[str] | None = None) -> list[int]:
    """Sorted versions of `name` that have a model file. A folder with a model file whose name is digits but
    no version (0, a leading zero, beyond MAX_VERSION) is left out and described in `skipped`."""
    folder = Path(repository) / check_model_name(name)
    if not folder.is_dir():
        return []
    found = []
    for path in folder.iterdir():
        if not path.name.isascii() or not path.name.isdigit() or not (path / MODEL_FILE).is_file():
            continue
        if _VERSION.fullmatch(path.name) and int(path.name) <= MAX_VERSION:
            found.append(int(path.name))
        elif skipped is not None:
            skipped.append(f"{name}/{path.name[:24]}: not a version (versions are 1 to {MAX_VERSION}, "
                           "without leading zeros)")
    return sorted(found)


def scan(repository: Path, skipped: list[str] | None = None) -> dict[str, list[int]]:
    """{model name: [versions]} of every valid model folder in the repository; version folders that are left
    out are described in `skipped`."""
    found: dict[str, list[int]] = {}
    root = Path(repository)
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if child.is_dir() and _NAME.fullmatch(child.name):
            versions = versions_on_disk(root, child.name, skipped)
            if versions:
                found[child.name] = versions
    return found


def next_version(versions: list[int]) -> int:
    """The version after the newest of `versions` (1 when there is none)."""
    version = max(versions, default=0) + 1
    if version > MAX_VERSION:
        raise RepositoryError(f"version: the newest version is already the highest allowed ({MAX_VERSION}); "
                              "give an explicit free version")
    return version


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_version(repository: Path, name: str, data: bytes, version: int = 0) -> tuple[int, Path]:
    """Write `data` as a new version (0 = newest + 1) atomically and durably; returns (version, path).

    Refuses to overwrite an existing version: versions are immutable once written.
    """
    if version == 0:
        version = next_version(versions_on_disk(repository, name))
    target_dir = version_dir(repository, name, version)
    target = target_dir / MODEL_FILE
    if target.exists():
        raise RepositoryError(f"version: {name} version {version} already exists")
    model_dir = target_dir.parent
    if not model_dir.is_dir():
        model_dir.mkdir(parents=True, exist_ok=True)
        _fsync_dir(model_dir.parent)
    staging = Path(tempfile.mkdtemp(dir=model_dir, prefix=UPLOAD_PREFIX))
    lock = os.open(staging, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)  # held while writing: a live upload is never taken for a stale one
        with open(staging / MODEL_FILE, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(staging, 0o755)
        os.fsync(lock)
        try:
            os.rename(staging, target_dir)  # replaces only an empty folder: never a written version
        except OSError:
            raise RepositoryError(f"version: {name} version {version} already exists") from None
        _fsync_dir(model_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        os.close(lock)
    return version, target


def remove_version(repository: Path, name: str, version: int) -> None:
    """Delete a version's folder (a write whose activation failed), durably."""
    target_dir = version_dir(repository, name, version)
    shutil.rmtree(target_dir, ignore_errors=True)
    if target_dir.parent.is_dir():
        _fsync_dir(target_dir.parent)


def _is_stale(path: Path) -> bool:
    """True unless a live writer holds the upload's lock."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def remove_stale_uploads(repository: Path) -> list[Path]:
    """Delete what interrupted writes left: temporary `<name>/.upload-*` folders and `<name>/<version>/.upload-*`
    files that no live writer holds, and a version folder that held nothing else. Returns what was removed."""
    removed: list[Path] = []
    root = Path(repository)
    if not root.is_dir():
        return removed
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir() and not p.is_symlink()):
        candidates = sorted(model_dir.glob(UPLOAD_PREFIX + "*"))
        for version in sorted(model_dir.iterdir()):
            if version.is_dir() and not version.is_symlink() and not version.name.startswith("."):
                candidates.extend(sorted(version.glob(UPLOAD_PREFIX + "*")))
        for path in candidates:
            if path.is_symlink():
                path.unlink(missing_ok=True)
            elif (path.is_file() or path.is_dir()) and not _is_stale(path):
                continue
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
            if path.parent != model_dir:
                try:
                    path.parent.rmdir()  # only when the interrupted write left the version folder empty
                    removed.append(path.parent)
                except OSError:
                    pass
    return removed
