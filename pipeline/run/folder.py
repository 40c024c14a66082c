"""The output folder and the processes of a run.

- One run at a time per folder: an exclusive lock for the run's lifetime; a second run is refused
  with one line naming the holder.
- Files come into the folder only by renaming a file made for them: never written through a link or
  a file that is already there.
- The continual state: a digest of every state file is recorded when it is written and checked
  before anything is loaded from it (DeepSpeed's checkpoints are pickles: a planted file would run code).
- Stopping: SIGTERM/SIGINT/SIGHUP, or the deepspeed launcher going away, stop a rank between two Python
  instructions; what is written is whole (atomic renames), what is half-made is dropped.
- Leftovers of killed runs: DeepSpeed's shared-memory buffers that no process maps any more.
"""
from __future__ import annotations

import datetime
import errno
import fcntl
import hashlib
import json
import os
import shutil
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from models.checkpoints import umask_file_mode

LOCK_NAME = ".dusa-run.lock"
# What the run writes in its folder besides renamed files: these must be real folders, never links.
OWN_FOLDERS = ("state", "pictures", "wandb")
# Read back to resume: a file behind a link would mix in another run's results or W&B run.
READ_BACK = ("results.json", "wandb_run_id", "images.csv")


class PeerError(ValueError):
    """A user error that another rank reports (and prints): this rank exits quietly."""


class Stopped(BaseException):
    """The run was told to stop (a signal, or its launcher is gone). A BaseException, so that code which
    keeps going after its own failures (W&B logging) does not swallow it."""

    def __init__(self, why: str, code: int):
        super().__init__(why)
        self.why, self.code = why, code  # code: the exit status, 128 + the signal's number


# ---------------------------------------------------------------------------------------------- the lock
class RunFolder:
    """`--output_dir`, locked by this process until it exits (or `release`)."""

    def __init__(self, path: Path, fd: int, created: list[Path]):
        self.path, self._fd, self._created = path, fd, created

    @classmethod
    def claim(cls, output_dir: str) -> "RunFolder":
        """Creates the folder if needed and takes its lock; ValueError (one line) when another run holds
        it, when it is not a folder, or when one of the run's own names in it is a link."""
        if not str(output_dir).strip():
            raise ValueError("--output_dir is empty: name the folder for the results")
        path = Path(output_dir)
        if path.exists() and not path.is_dir():
            raise ValueError(f"--output_dir {path} is a file, not a folder: use another --output_dir")
        for name in (LOCK_NAME, *READ_BACK, *OWN_FOLDERS):
            if (path / name).is_symlink():
                raise ValueError(f"{path / name} is a link: a run writes only into files and folders it made; "
                                 f"remove the link or use another --output_dir")
        created = [p for p in (path, *path.parents) if not p.exists()][::-1]  # outermost first
        path.mkdir(parents=True, exist_ok=True)
        lock = path / LOCK_NAME
        while True:
            try:
                # O_NOFOLLOW: a link planted since the check above is refused, not followed.
                fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
            except OSError as exc:
                _remove_created(created)
                if exc.errno == errno.ELOOP:
                    raise ValueError(f"{lock} is a link: remove it or use another --output_dir") from exc
                raise
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _describe_holder(os.pread(fd, 4096, 0))
                os.close(fd)
                raise ValueError(f"--output_dir {path} is in use by another run ({holder}): wait for it to end, "
                                 f"stop it, or use another --output_dir") from None
            # The previous holder removes the file as it ends: lock the file that is at the path now.
            try:
                same = os.path.samestat(os.fstat(fd), os.lstat(lock))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        record = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds")})
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        return cls(path, fd, created)

    def release(self, started: bool = True) -> None:
        """Removes the lock file and unlocks; a run that never started also removes the folders it made
        (when they hold nothing else)."""
        if self._fd < 0:
            return
        try:
            (self.path / LOCK_NAME).unlink(missing_ok=True)  # while still holding it (see `claim`)
        finally:
            os.close(self._fd)
            self._fd = -1
        if not started:
            _remove_created(self._created)


def _remove_created(created: list[Path]) -> None:
    for folder in reversed(created):  # innermost first; only while empty
        try:
            folder.rmdir()
        except OSError:
            return


def _describe_holder(raw: bytes) -> str:
    try:
        holder = json.loads(raw.decode())
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}"
    except (ValueError, KeyError, TypeError):
        return "holder unknown"


# ------------------------------------------------------------------------------------------ safe writes
def own_folder(root: Path, relative: str | Path = "") -> Path:
    """Creates root/relative level by level where missing; refuses a level below root that is a link
    (root itself is the user's choice)."""
    folder = Path(root)
    folder.mkdir(parents=True, exist_ok=True)
    for part in Path(relative).parts:
        folder = folder / part
        if folder.is_symlink():
            raise ValueError(f"{folder} is a link: a run writes only into folders it made; remove it")
        folder.mkdir(exist_ok=True)
    return folder


_FILE_MODE = umask_file_mode()


def write_atomic(target: Path, write: Callable, root: Path | None = None) -> Path:
    """`write(binary file)` into a new temporary file beside `target`, then a rename over it: readers never
    see a half-written file, and a link or file already at `target` is replaced, never written through.
    `root`: the output folder; the folders between it and `target` must not be links."""
    target = Path(target)
    own_folder(root, target.parent.relative_to(root)) if root is not None else target.parent.mkdir(
        parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)  # mkstemp makes 0600: give the mode of any file the user creates
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def write_text_atomic(target: Path, text: str, root: Path | None = None) -> Path:
    return write_atomic(target, lambda f: f.write(text.encode()), root)


def free_local_port() -> int:
    """A TCP port free on this host now (for a launcher's --master_port or a one-process run)."""
    import socket
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def remove_path(path: Path) -> None:
    """Removes a file, a link (not its target) or a folder tree."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.is_dir():
        shutil.rmtree(path)


# ------------------------------------------------------------------------------------------ state files
def file_digests(root: Path, names: list[str]) -> dict[str, str]:
    """SHA-256 of every file under root/<name> (files or folders), by path relative to root; refuses a
    link or anything but files and folders."""
    digests: dict[str, str] = {}
    for name in names:
        top = root / name
        paths = [top] if not top.is_dir() or top.is_symlink() else sorted(top.rglob("*"))
        for path in paths:
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise ValueError(f"{path} is not a regular file")
            if path.is_file():
                with open(path, "rb") as f:
                    digests[path.relative_to(root).as_posix()] = hashlib.file_digest(f, "sha256").hexdigest()
    return digests


def verify_files(root: Path, names: list[str], expected: dict[str, str], fix: str) -> None:
    """ValueError (one line, with `fix`) unless root/<names> holds exactly the files of `expected`,
    with those digests: checked before anything is loaded from them."""
    def refuse(reason: str):
        raise ValueError(f"{root} does not hold the state this run wrote ({reason}); it is not loaded: {fix}")
    if not expected:
        refuse("no digests were recorded for it")
    try:
        found = file_digests(root, names)
    except (ValueError, OSError) as exc:
        refuse(str(exc))
    if set(found) != set(expected):
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        refuse(", ".join([*(f"{p} was not written by it" for p in extra[:3]),
                          *(f"{p} is missing" for p in missing[:3])]))
    changed = sorted(p for p in found if found[p] != expected[p])
    if changed:
        refuse(f"{changed[0]} was changed{f' (and {len(changed) - 1} more)' if len(changed) > 1 else ''}")


# ----------------------------------------------------------------------------------- stopping a rank
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
ECHO_S = 5.0  # a stop signal this soon after the first is its echo, not a second request


def stop_on_signals() -> None:
    """SIGTERM, SIGINT and SIGHUP raise `Stopped` in the main thread; a second one (more than `ECHO_S`
    later) ends the process at once. Processes forked from this one (data-loader workers) just end: their
    parent reports."""
    owner = os.getpid()

    def handler(signum, frame):
        if os.getpid() != owner:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        first = time.monotonic()

        def again(*_):  # echoes of the first (the launcher and the watchdog both pass it on) are ignored
            if time.monotonic() - first > ECHO_S:
                os._exit(128 + signum)
        for s in STOP_SIGNALS:
            signal.signal(s, again)
        raise Stopped(f"stopped by {signal.Signals(signum).name}", 128 + signum)
    handler.stops_run = True
    for s in STOP_SIGNALS:
        signal.signal(s, handler)
    # The C-level trace of every signal: one that arrives while the main thread waits in a collective may
    # never reach `handler` (a peer stopped first and the wait fails), yet the run was told to stop.
    global _signal_trace
    if _signal_trace is None:
        read, write = os.pipe()
        os.set_blocking(read, False)
        os.set_blocking(write, False)
        signal.set_wakeup_fd(write, warn_on_full_buffer=False)
        _signal_trace = read


_signal_trace: int | None = None


def stop_signal_received() -> int | None:
    """A stop signal this process received so far (its number), whether or not its handler ran."""
    if _signal_trace is None:
        return None
    try:
        received = os.read(_signal_trace, 1024)
    except BlockingIOError:
        return None
    return next((n for n in received if n in {int(s) for s in STOP_SIGNALS}), None)


def default_signals() -> None:
    """The signals' default actions again, where `stop_on_signals` set them: a process that is leaving
    ends quietly when told to stop."""
    for s in STOP_SIGNALS:
        if getattr(signal.getsignal(s), "stops_run", False):
            signal.signal(s, signal.SIG_DFL)


def launcher_processes() -> list:
    """The deepspeed launcher processes above this rank (its `launch` and the `deepspeed` runner that
    started it), as psutil processes; empty when the rank was started otherwise."""
    import psutil
    found = []
    try:
        process = psutil.Process().parent()
        while process is not None and process.pid > 1 and len(found) < 2:
            line = " ".join(process.cmdline())
            if "deepspeed" not in line:
                break
            found.append(process)
            process = process.parent()
    except psutil.Error:
        pass
    return found


_watched: list = []  # the launcher processes that the watchdog watches


def _running(process) -> bool:
    import psutil
    try:  # an ended launcher stays a zombie until its own parent reaps it
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def launcher_ended() -> bool:
    """Whether a watched launcher process has ended (the run was told to stop, though the watchdog may not
    have noticed yet)."""
    return any(not _running(p) for p in _watched)


def stop_when_launcher_ends(processes: list, interval: float = 1.0, grace: float = 60.0) -> threading.Thread | None:
    """A watchdog thread: when one of `processes` has ended (the launcher was killed or told to stop,
    which the single-node launcher does not pass on), this process stops as on SIGTERM, and is ended
    outright if it has not exited `grace` seconds later (blocked in a collective, say)."""
    if not processes:
        return None

    _watched[:] = processes

    def watch():
        while all(_running(p) for p in processes):
            time.sleep(interval)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace)
        os._exit(128 + signal.SIGTERM)
    thread = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    thread.start()
    return thread


# ------------------------------------------------------------------------ leftovers of killed runs
SHM = Path("/dev/shm")


def orphaned_shared_memory(prefix: str, min_age_s: float = 60.0, shm: Path = SHM, proc: Path = Path("/proc")
                           ) -> list[Path]:
    """Files `shm/<prefix>*` of this user that no running process maps or holds open, older than
    `min_age_s` (a buffer that is being created is not mapped yet). Empty when that cannot be proven:
    a Python process of this user whose mappings cannot be read (a DeepSpeed rank is one)."""
    now = time.time()
    uid = os.getuid()
    candidates = []
    for path in shm.glob(f"{prefix}*") if shm.is_dir() else []:
        try:
            st = path.lstat()
        except FileNotFoundError:
            continue
        if st.st_uid == uid and path.is_file() and not path.is_symlink() and now - st.st_mtime >= min_age_s:
            candidates.append(path)
    if not candidates:
        return []
    names = {str(p) for p in candidates}
    in_use: set[str] = set()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            for line in (entry / "maps").read_text().splitlines():
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].removesuffix(" (deleted)") in names:
                    target = fields[5].removesuffix(" (deleted)")
                    in_use.add(target)
            for fd in (entry / "fd").iterdir():
                try:
                    target = os.readlink(fd)
                except OSError:
                    continue
                if target in names:
                    in_use.add(target)
        except (FileNotFoundError, ProcessLookupError):
            continue  # ended meanwhile
        except PermissionError:
            try:
                owner, command = entry.stat().st_uid, (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if owner == uid and (b"python" in command or b"deepspeed" in command):
                return []  # possibly a rank of ours that we cannot see into: nothing is proven
    return [p for p in candidates if str(p) not in in_use]


def remove_orphaned_shared_memory(prefix: str, **kwargs) -> list[Path]:
    """Removes `orphaned_shared_memory(prefix)`; returns what it removed."""
    removed = []
    for path in orphaned_shared_memory(prefix, **kwargs):
        try:
            path.unlink()
            removed.append(path)
        except FileNotFoundError:
            pass
    return removed
