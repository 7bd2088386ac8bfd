"""One run per dump folder: an advisory lock held by rank 0 for the whole run.

Two runs writing the same checkpoints and `metrics.jsonl` corrupt each other (one dies mid-save,
the metrics interleave). Rank 0 takes an exclusive `flock` on `<dump_folder>/.titan_geonorm.lock`
before anything is built and writes its host and pid there; a second run is refused naming them.
The kernel drops the lock when its process dies, however it dies, so a lock file left by a killed
run is simply taken over. `flock` is per host: on a shared file system across nodes only runs whose
rank 0 shares a host are kept apart (on NFS, locks may not be honoured at all).
"""

import fcntl
import os
import socket

LOCK_NAME = ".titan_geonorm.lock"


class DumpFolderBusy(RuntimeError):
    pass


def lock_dump_folder(dump_folder: str) -> int:
    """Take the lock (or raise `DumpFolderBusy` naming its holder); return the descriptor, which
    must stay open for as long as the run."""
    os.makedirs(dump_folder, exist_ok=True)
    path = os.path.join(dump_folder, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 256).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise DumpFolderBusy(
            f"job.dump_folder = {dump_folder!r} is in use by a running job ({holder}, lock {path}): "
            "wait for it, stop it, or choose another job.dump_folder"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"host {socket.gethostname()} pid {os.getpid()}\n".encode())
    return fd
