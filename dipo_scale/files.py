"""Writing files so that nothing half-written is ever left behind (temp path, then rename), output
locations that never destroy what a command did not create (a marker file), and the hashes that
verify files before they are trusted.

Output directories. Every command that writes a directory marks it with `.dipo-scale.json`
({"command": ...}). A command writes into (or replaces) a directory only when it is new, empty,
or marked as the same command's earlier output; a directory equal to or inside one of the
command's inputs is refused. Files and directories are created with the permissions the umask
gives (temporary names from `tempfile` would otherwise be 0600 / 0700, and some writers, like
safetensors' `save_file`, make their files 0600 whatever the umask): `atomic_dir` gives them to
everything in its directory before it is renamed into place.

Locks. A command that runs in an output directory holds it (`hold_output_dir`: an exclusive
`flock` on `.dipo-scale.lock` in it, which the kernel releases when the process ends, however it
ends); a second command on the same directory meanwhile is refused in one line naming the holder
(`check_output_dir`, before any work, and again when it would take the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import stat
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from dipo_scale.errors import UserInputError

MARKER = ".dipo-scale.json"
LOCK = ".dipo-scale.lock"
_held: dict[Path, int] = {}  # directories this process holds -> the lock file's descriptor


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path) -> None:
    """Give `path` the permissions the umask gives a new file (0666 less the umask), directory or
    executable (0777 less the umask)."""
    mode = os.stat(path).st_mode
    os.chmod(path, (0o777 if stat.S_ISDIR(mode) or mode & 0o111 else 0o666) & ~_umask())


def follow_umask_within(root: Path) -> None:
    """`follow_umask` for `root` and everything in it (links, and what they point to, aside)."""
    follow_umask(root)
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            if not os.path.islink(os.path.join(parent, name)):
                follow_umask(os.path.join(parent, name))


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        follow_umask(tmp)
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


def _marker(path: Path) -> dict | None:
    """The marker of an output directory (None when absent or unreadable)."""
    try:
        marker = json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _holder(path: Path) -> str | None:
    """Who holds `path`'s lock ("`dipo-scale unlearn` (pid 12, host h, since ...)"), None when no
    other process does (this one holding it is no conflict)."""
    path = path.resolve()
    if path in _held or not (path / LOCK).is_file():
        return None
    try:
        fd = os.open(path / LOCK, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return None
    except BlockingIOError:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
            return (f"`dipo-scale {info['command']}` (pid {info['pid']} on {info['host']}, "
                    f"since {info['since']})")
        except (ValueError, KeyError, TypeError):
            return "another process"
    finally:
        os.close(fd)


@contextlib.contextmanager
def hold_output_dir(path: str | Path, command: str, *, flag: str = "--out") -> Iterator[None]:
    """Hold `path` (an output directory this command created or may reuse, `check_output_dir`)
    for the block: refused in one line when another process holds it. Re-entrant within a
    process. The lock file stays (an unheld one means nothing)."""
    path = Path(path).resolve()
    if path in _held:
        yield
        return
    path.mkdir(parents=True, exist_ok=True)
    fd = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o666 & ~_umask())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise UserInputError(f"{flag} {path}: in use by {_holder(path) or 'another process'}; wait for it "
                             "to end (or stop it), then run again") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"command": command, "pid": os.getpid(), "host": socket.gethostname(),
                              "since": datetime.now(timezone.utc).isoformat(timespec="seconds")}).encode(), 0)
    _held[path] = fd
    try:
        yield
    finally:
        del _held[path]
        os.close(fd)  # releases the lock


def absolute_if_local(path: str | None) -> str | None:
    """`path` made absolute when it names something on this machine (a hub name, or nothing, stays
    as it is): what a Ray worker or trial, running in another directory, can open."""
    return str(Path(path).resolve()) if path and Path(path).exists() else path


def _is_within(path: Path, other: Path) -> bool:
    return path == other or other in path.parents


def check_output_dir(path: str | Path, command: str, *, flag: str = "--out",
                     inputs: Iterable[tuple[str, str | Path | None]] = ()) -> Path:
    """Refuse, in one line, an output directory `command` may not write (module docstring):
    a file, a directory equal to or inside an input (`inputs`: (flag, path) pairs), one another
    process holds (`hold_output_dir`), a non-empty directory not marked as this command's output,
    or a place where nothing can be created.
    Creates nothing. Returns the absolute path."""
    out = Path(path).expanduser().resolve()
    for input_flag, source in inputs:
        if source and Path(source).exists() and _is_within(out, Path(source).resolve()):
            raise UserInputError(f"{flag} {path}: is {'' if out == Path(source).resolve() else 'inside '}the "
                                 f"input {input_flag} {source}; choose an output outside the inputs")
    if out.exists() and not out.is_dir():
        raise UserInputError(f"{flag} {path}: exists and is not a directory")
    if out.is_dir() and any(p.name != LOCK for p in out.iterdir()):  # (a lock alone claims nothing)
        holder = _holder(out)
        if holder:
            raise UserInputError(f"{flag} {path}: in use by {holder}; wait for it to end (or stop it), "
                                 "then run again")
        marker = _marker(out)
        if marker is None or marker.get("command") != command:
            made_by = f" (it is the output of `dipo-scale {marker.get('command')}`)" if marker else ""
            raise UserInputError(f"{flag} {path}: not empty and not an earlier output of `dipo-scale {command}`"
                                 f"{made_by}; choose a new or empty directory")
    # where the command will write (an earlier output that became unwritable is found now, not
    # when the work is done; atomic_dir makes its temporary directory beside it before any work)
    place = out if out.is_dir() else next(p for p in out.parents if p.exists())
    try:  # a real attempt: permission bits say little for root, immutable files, read-only mounts or /proc
        probe = tempfile.mkdtemp(dir=place, prefix=".dipo-scale-probe.")
        os.rmdir(probe)
    except OSError as e:
        raise UserInputError(f"{flag} {path}: cannot {'write in' if place == out else 'create'} it "
                             f"({e.strerror or e} in {place})") from None
    return out


def mark_output_dir(path: str | Path, command: str) -> None:
    """Create `path` (if needed) and mark it as `command`'s output."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    if (_marker(path) or {}).get("command") != command:
        atomic_write_json(path / MARKER, {"command": command,
                                          "created": datetime.now(timezone.utc).isoformat(timespec="seconds")})


@contextlib.contextmanager
def atomic_dir(path: str | Path, command: str) -> Iterator[Path]:
    """Yield a temporary sibling directory, marked as `command`'s output; on success everything
    in it gets the umask's permissions and it replaces `path`, on any failure it is removed. An
    existing `path` is replaced only when it is empty or `command`'s own earlier output
    (`check_output_dir`). A `path` that is a symbolic link: the directory it points to is the one
    written (the link stays)."""
    path = check_output_dir(path, command)  # absolute, links resolved
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        mark_output_dir(tmp, command)
        yield tmp
        follow_umask_within(tmp)
        check_output_dir(path, command)  # nothing foreign appeared meanwhile
        if path.exists():  # set aside until the new one is in place
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_run_dir(run_dir: str | Path, config: dict, command: str,
                  started: Callable[[Path], bool] = lambda run_dir: False, *,
                  inputs: Iterable[tuple[str, str | Path | None]] = ()) -> None:
    """Refuse a run directory `claim_run_dir` may not claim (nothing is written): see
    `check_output_dir`; a garbage config.json; a different config once the run has `started`
    (made progress worth keeping). A run that failed before its first step claims nothing: a
    different config replaces its record."""
    run_dir = Path(run_dir)
    check_output_dir(run_dir, command, flag="out_dir", inputs=inputs)
    saved = run_dir / "config.json"
    if saved.is_file():
        try:
            previous = json.loads(saved.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise UserInputError(f"{saved}: malformed JSON ({' '.join(str(e).split())}); this is not a "
                                 "run directory this command can resume: choose another out_dir") from None
        if previous != json.loads(json.dumps(config)) and started(run_dir):  # (tuples -> lists, as in the file)
            raise UserInputError(f"{run_dir}: holds a run with a different config (re-run with the same "
                                 "config to resume it, or choose another out_dir)")


def claim_run_dir(run_dir: str | Path, config: dict, command: str,
                  started: Callable[[Path], bool] = lambda run_dir: False) -> None:
    """`check_run_dir`, then record `config` in run_dir/config.json and mark run_dir as
    `command`'s output; a rerun with the same config resumes there."""
    check_run_dir(run_dir, config, command, started)
    mark_output_dir(run_dir, command)
    atomic_write_json(Path(run_dir) / "config.json", config)


def reopen_step_log(path: str | Path, finished_steps: int) -> tuple[list[dict], Any]:
    """A JSON-lines log of records with a "step", cut back to the steps a restored checkpoint
    holds (redone steps are logged again, so each step appears once; a line cut short by a crash
    goes), and opened for appending. Returns (the kept records, the open file)."""
    path, kept = Path(path), []
    if finished_steps and path.is_file():
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step", 0) <= finished_steps:
                kept.append(record)
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
    return kept, open(path, "a")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def json_digest(obj) -> str:
    """A short fingerprint of a JSON-able object (keys sorted): what a reuse compares it by."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def sampled_fingerprint(model_dir: str | Path, samples: int = 16, sample_bytes: int = 1 << 20) -> str:
    """A fingerprint of a model directory that reads at most `samples` × `sample_bytes` per file
    whatever the model's size: sha256 over config.json and, per weight file, its name, its size and
    `samples` slices spread evenly over it (its start, the safetensors header, included). Other
    weights in the same architecture differ in every slice. For identities checked at every start
    (a 7B model's full `weights_fingerprint` reads 14 GB)."""
    root = Path(model_dir)
    h = hashlib.sha256()
    for path in sorted(p for p in root.iterdir() if p.is_file()
                       and (p.name == "config.json" or p.suffix in WEIGHT_SUFFIXES)):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            for i in range(samples if size > samples * sample_bytes else 1):
                f.seek(i * max(0, size - sample_bytes) // max(1, samples - 1))
                h.update(f.read(sample_bytes if size > samples * sample_bytes else size))
    return h.hexdigest()[:16]


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over config.json and the weight files of a local model directory (16 hex digits)."""
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
