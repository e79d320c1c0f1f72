"""Writing files so that nothing half-written is ever left behind (temp path, then rename), and
the hashes that verify files before they are trusted."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces `path`, on failure it is removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def claim_run_dir(run_dir: str | Path, config: dict) -> None:
    """Record `config` in run_dir/config.json; refuse a run_dir that holds a different one (a rerun
    with the same config resumes there)."""
    from dipo_scale.errors import UserInputError

    saved = Path(run_dir) / "config.json"
    config = json.loads(json.dumps(config))  # tuples -> lists, as they come back from the file
    if saved.is_file() and json.loads(saved.read_text()) != config:
        raise UserInputError(f"{run_dir}: holds a run with a different config (re-run with the same "
                             "config to resume it, or choose another out_dir)")
    atomic_write_json(saved, config)


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and the weight files of a local model directory (16 hex digits)."""
    from dipo_scale.errors import UserInputError

    root = Path(model_dir)
    if not root.is_dir():
        raise UserInputError(f"{model_dir}: not a local model directory (download the model first)")
    files = sorted(p for p in root.iterdir() if p.is_file()
                   and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES))
    if not any(p.suffix in WEIGHT_SUFFIXES for p in files):
        raise UserInputError(f"{model_dir}: no weight files (*.safetensors, *.bin)")
    h = hashlib.sha256()
    for path in files:
        h.update(path.name.encode())
        h.update(sha256_file(path).encode())
    return h.hexdigest()[:16]
