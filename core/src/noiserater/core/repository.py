"""The on-disk model repository layout, `<repo>/<name>/<version>/model.onnx`, shared by the server
(which loads and writes it) and `nrctl deploy --repository` (which writes it without a server).

Model names are validated here so that no name can escape the repository.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from noiserater.core.text import clip

MODEL_FILE = "model.onnx"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # always fullmatch: `$` would let a final "\n" by


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


def version_dir(repository: Path, name: str, version: int) -> Path:
    if version < 1:
        raise RepositoryError(f"version: versions are integers >= 1, got {version}")
    return Path(repository) / check_model_name(name) / str(version)


def versions_on_disk(repository: Path, name: str) -> list[int]:
    """Sorted versions of `name` that have a model file."""
    folder = Path(repository) / check_model_name(name)
    if not folder.is_dir():
        return []
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit() and (p / MODEL_FILE).is_file())


def scan(repository: Path) -> dict[str, list[int]]:
    """{model name: [versions]} of every valid model folder in the repository."""
    found: dict[str, list[int]] = {}
    root = Path(repository)
    if not root.is_dir():
        return found
    for child in sorted(root.iterdir()):
        if child.is_dir() and _NAME.fullmatch(child.name):
            versions = versions_on_disk(root, child.name)
            if versions:
                found[child.name] = versions
    return found


def write_version(repository: Path, name: str, data: bytes, version: int = 0) -> tuple[int, Path]:
    """Write `data` as a new version (0 = newest + 1) atomically; returns (version, path).

    Refuses to overwrite an existing version: versions are immutable once written.
    """
    if version == 0:
        existing = versions_on_disk(repository, name)
        version = (existing[-1] + 1) if existing else 1
    target_dir = version_dir(repository, name, version)
    target = target_dir / MODEL_FILE
    if target.exists():
        raise RepositoryError(f"version: {name} version {version} already exists")
    target_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target_dir, prefix=".upload-")
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
    os.replace(tmp, target)
    return version, target
