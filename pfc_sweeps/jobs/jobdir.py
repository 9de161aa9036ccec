"""One job dir, one config, one process (issue: trustworthy result tables).

A job dir belongs to the config it was first started with: :func:`fingerprint` flattens the
resolved config (minus :data:`EXCLUDED` keys, which may differ on a resume) and the job
records it in :data:`~pfc_sweeps.results.schema.FINGERPRINT_FILE` with its first results. A rerun
whose fingerprint differs stops with one line naming the keys, before touching any file.

:class:`JobLock` holds an exclusive ``flock`` on :data:`~pfc_sweeps.results.schema.LOCK_FILE` for the
job's life; the kernel frees it when the process dies, so a killed or requeued job resumes.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import re
import socket
from pathlib import Path
from typing import Any

from pfc_sweeps.errors import PFCError
from pfc_sweeps.nets.legacy import current_target
from pfc_sweeps.results.schema import (
    ERROR_FILE,
    FINGERPRINT_FILE,
    LOCK_FILE,
    TEMP_GLOB,
    atomic_write_bytes,
)

__all__ = [
    "EXCLUDED",
    "JobDirError",
    "JobLock",
    "check_fingerprint",
    "check_not_busy",
    "check_usable_dir",
    "fingerprint",
    "remove_stale_temps",
    "write_error",
    "write_fingerprint",
]

#: Keys (and key prefixes) left out of the fingerprint: they say how or where a job runs,
#: not what it computes, and may legitimately change on a resume (docs/jobdirs.md).
EXCLUDED = (
    "logger",
    "train.device",
    "train.cache_gb",
    "train.num_threads",
    "train.data_gb",  # in memory or streamed: the same batches, the same rows
    "train.num_workers",
    "train.eval_batch_size",
    "train.deterministic",  # how kernels reduce: rows equal within float32 rounding
    # how many processes run it and how they talk: a job resumes on any world size
    # (docs/distributed.md); sync_bn only matters with several ranks
    "train.distributed",
    "train.dist_timeout_s",
    "train.sync_bn",
    "train.metric_precision",  # float64 or fast path: the same metrics to ~1e-6 or better
    "dataset.root",
    "dataset.download",
)


class JobDirError(PFCError):
    """The job dir cannot be used by this run (a file, unwritable, busy, another config)."""


def _excluded(key: str) -> bool:
    return any(key == e or key.startswith(e + ".") for e in EXCLUDED)


def fingerprint(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """The resolved config as a flat ``{"train.epochs": 4, ...}`` without :data:`EXCLUDED`."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if _excluded(path):
            continue
        if isinstance(value, dict):
            out.update(fingerprint(value, f"{path}."))
        else:
            out[path] = value
    return out


def _show(fp: dict[str, Any], keys: list[str]) -> str:
    return ", ".join(f"{k}={json.dumps(fp[k]) if k in fp else '(unset)'}" for k in keys)


def check_fingerprint(out_dir: Path, fp: dict[str, Any]) -> None:
    """Raise :class:`JobDirError` naming every key whose value differs from the recorded one."""
    path = out_dir / FINGERPRINT_FILE
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise JobDirError(
            f"{path} is unreadable ({type(e).__name__}); use a new hydra.run.dir"
        ) from None
    fp = json.loads(json.dumps(fp))  # the types JSON gives back (tuples -> lists)
    old = {k: current_target(v) if k.endswith("._target_") else v for k, v in old.items()}
    diff = sorted(k for k in set(old) | set(fp) if old.get(k, ...) != fp.get(k, ...))
    if diff:
        raise JobDirError(
            f"{out_dir} was started with {_show(old, diff)}, this run has {_show(fp, diff)}; "
            "use a new hydra.run.dir (or hydra.sweep.dir)"
        )


def write_fingerprint(out_dir: Path, fp: dict[str, Any]) -> None:
    """Record ``fp`` as the dir's config (once: an existing record is kept)."""
    path = out_dir / FINGERPRINT_FILE
    if not path.exists():
        atomic_write_bytes(path, json.dumps(fp, indent=1, sort_keys=True).encode())


def check_usable_dir(path: Path) -> None:
    """Raise :class:`JobDirError` unless ``path`` is (or can be made) a writable directory.

    A name the file system refuses (too long, a character it does not allow) is one line
    naming the path. The missing part of ``path`` is made and removed at once when one of
    its names is not plain ASCII (letters, digits, ``.,=+@-_`` and spaces), the only way to
    learn what a file system allows; plain names are checked against its limits only.
    """
    path = Path(path)
    try:
        missing = _check_dir(path)
        if not all(_PLAIN.fullmatch(p.name) for p in missing):
            _try_make(missing)
    except OSError as e:  # stat or mkdir of a name the file system refuses
        raise JobDirError(
            f"{path}: the file system refuses this name ({e.strerror or type(e).__name__}); "
            "choose a shorter output dir name with plain characters"
        ) from None


#: Names that every file system takes (up to its length limits).
_PLAIN = re.compile(r"[A-Za-z0-9._,=+@ -]*")


def _check_dir(path: Path) -> list[Path]:
    """The checks of :func:`check_usable_dir`; returns the missing dirs, deepest first."""
    if path.exists() and not path.is_dir():
        raise JobDirError(f"{path} is a file, not a directory; choose another output dir")
    missing, probe = [], path
    while not probe.exists():
        missing.append(probe)
        probe = probe.parent
    if not probe.is_dir():
        raise JobDirError(f"{probe} is a file, so {path} cannot be created; choose another dir")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise JobDirError(f"{probe} is not writable; choose another output dir (hydra.run.dir)")
    limit = os.pathconf(probe, "PC_NAME_MAX")
    for p in missing:
        if len(os.fsencode(p.name)) > limit:
            raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(p))
    if len(os.fsencode(path.absolute())) >= os.pathconf(probe, "PC_PATH_MAX"):
        raise OSError(errno.ENAMETOOLONG, os.strerror(errno.ENAMETOOLONG), str(path))
    return missing


def _try_make(missing: list[Path]) -> None:
    """Make the ``missing`` dirs (deepest last) and remove them again: nothing is left."""
    made: list[Path] = []
    try:
        for p in reversed(missing):
            try:
                os.mkdir(p)
            except FileExistsError:  # another process made it meanwhile: not ours to remove
                break
            made.append(p)
    finally:
        for p in reversed(made):
            try:
                os.rmdir(p)
            except OSError:
                pass  # another process wrote into it meanwhile: it is theirs now


def remove_stale_temps(out_dir: Path) -> list[Path]:
    """Delete temporary files of interrupted atomic writes (``.<name>.*.tmp``)."""
    stale = sorted(out_dir.glob(TEMP_GLOB))
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def write_error(out_dir: Path, line: str) -> None:
    """Record a failed job's one-line error in its dir (``analysis.aggregate`` shows it)."""
    atomic_write_bytes(out_dir / ERROR_FILE, (line.rstrip("\n") + "\n").encode())


def check_not_busy(out_dir: Path) -> None:
    """Raise :class:`JobDirError` if a running job holds ``out_dir``'s lock; changes nothing.

    ``launch.py`` calls it before Hydra starts when ``hydra.run.dir`` is given, so that a
    second process stops at once; the job itself then takes the lock for real.
    """
    try:
        busy = (Path(out_dir) / LOCK_FILE).exists()
    except OSError:  # a name the file system refuses: check_usable_dir says so in one line
        check_usable_dir(out_dir)
        raise
    if busy:
        JobLock(out_dir).acquire().release()


class JobLock:
    """An exclusive, non-blocking ``flock`` on ``<out_dir>/.lock``, held until :meth:`release`.

    The lock file names its holder (host and pid). A second process gets a
    :class:`JobDirError` naming the dir and the holder, and writes nothing.
    """

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / LOCK_FILE
        self.fd: int | None = None
        self.owned = False

    def acquire(self) -> JobLock:
        """Take the lock without changing the dir (a stale lock file of a dead job is reused)."""
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o666)
                created = True
            except FileExistsError:
                fd, created = self._open(), False
            except OSError as e:
                raise JobDirError(f"cannot create {self.path}: {e.strerror}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "pid unknown"
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EACCES, errno.EAGAIN):
                    raise JobDirError(f"cannot lock {self.path}: {e.strerror}") from None
                raise JobDirError(
                    f"{self.path.parent} is in use by another job ({holder}); wait for it to "
                    "end or use a new hydra.run.dir"
                ) from None
            try:  # the holder may have deleted the file between our open and flock: retry
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self.fd, self.owned = fd, created
        return self

    def _open(self) -> int:
        try:
            return os.open(self.path, os.O_RDWR)
        except OSError as e:
            raise JobDirError(f"cannot open {self.path}: {e.strerror}") from None

    def claim(self) -> None:
        """Write the holder (host and pid) into the lock file, for a second process to name."""
        assert self.fd is not None
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"host {socket.gethostname()} pid {os.getpid()}".encode(), 0)
        self.owned = True

    def release(self) -> None:
        """Unlock; the lock file goes if this job made or claimed it (else it stays untouched)."""
        if self.fd is not None:
            if self.owned:  # still locked: nobody else can hold this inode
                self.path.unlink(missing_ok=True)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> JobLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
