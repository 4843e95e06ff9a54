"""Writing a folder so that no reader ever sees it half-written, and a process killed at any point leaves it whole.

Everything is written into a staging folder beside the target first. A new target is that folder renamed into
place. An existing one is exchanged with it in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`, macOS
`renamex_np(RENAME_SWAP)`), after the files of the target that the write does not replace were linked into the
staging folder: so the target holds the old files or the new ones, never a mix, whenever the process dies. On a
system without an atomic exchange the files are moved in one by one, the weights last (best effort; docs/security.md).
A staging folder left by a killed process is removed by the next write beside it.

This is a Hub code file: it imports only the standard library.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import stat
import sys
from collections.abc import Callable, Collection


STAGING_PREFIX = ".vptm-save-"


def give_default_permissions(folder: str) -> None:
    """Gives every file in `folder` the permissions a new file gets here (the umask's), as any other file a run
    writes has: safetensors writes its files readable by their owner only (0600), which hides a published checkpoint
    from the other users of a shared machine. The mode is read off a file made for the purpose, since reading the
    umask means changing it, for every thread of the process."""
    probe = os.path.join(folder, f".mode-{os.urandom(4).hex()}")
    os.close(os.open(probe, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    mode = stat.S_IMODE(os.stat(probe).st_mode)
    os.remove(probe)
    for root, _, names in os.walk(folder):
        for name in names:
            os.chmod(os.path.join(root, name), mode)


def staging_name() -> str:
    """A staging folder's name: whose it is (host and process), so that a later write can tell a dead one's."""
    host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())[:64]
    return f"{STAGING_PREFIX}{host}-{os.getpid()}-{os.urandom(6).hex()}"


def remove_stale_staging(parent: str) -> None:
    """Removes the staging folders in `parent` that a process of this host left when it was killed (its process is
    gone); those of live processes, or of other hosts sharing the folder, are left alone."""
    host = "".join(c if c.isalnum() or c in "-." else "_" for c in socket.gethostname())[:64]
    for name in os.listdir(parent):
        if not name.startswith(f"{STAGING_PREFIX}{host}-"):
            continue
        pid = name[len(f"{STAGING_PREFIX}{host}-") :].split("-")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def exchange(first: str, second: str) -> bool:
    """Swaps two paths in one atomic step; False where the system has no such call (or the filesystem refuses it)."""
    import ctypes
    import ctypes.util

    sys.audit("vptm.exchange", first, second)  # a fault-injection test stops a save here, as at any file operation
    libc_name = ctypes.util.find_library("c")
    if libc_name is None:
        return False
    libc = ctypes.CDLL(libc_name, use_errno=True)
    paths = (os.fsencode(first), os.fsencode(second))
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        at_fdcwd, rename_exchange = -100, 2
        result = libc.renameat2(at_fdcwd, paths[0], at_fdcwd, paths[1], rename_exchange)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        rename_swap = 2
        result = libc.renamex_np(paths[0], paths[1], rename_swap)
    else:
        return False
    if result == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # no atomic exchange here
        return False
    raise OSError(code, os.strerror(code), first)


def link_or_copy(source: str, target: str) -> None:
    """`target` as a hard link to `source` (the same file, no copy), or a copy where links are not possible."""
    try:
        os.link(source, target, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, target, follow_symlinks=False)


def carry_over(old: str, staging: str, drop: Collection[str] = ()) -> None:
    """Links into `staging` the files and folders of `old` that the write did not produce (a Trainer's checkpoints,
    an image processor saved beside the model, a model card), but those named in `drop`, so that the exchange keeps
    them."""
    for name in os.listdir(old):
        source, target = os.path.join(old, name), os.path.join(staging, name)
        if os.path.lexists(target) or name in drop:
            continue
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True, copy_function=link_or_copy)
        else:
            link_or_copy(source, target)


def write_atomically(
    save_directory: str | os.PathLike, write: Callable[[str], None], drop: Collection[str] = ()
) -> None:
    """Runs `write(folder)` on a fresh staging folder beside `save_directory`, then puts what it wrote in place: a new
    folder appears whole, an existing one is exchanged whole with the staging folder (its other files kept, but those
    named in `drop`), so that a failure, or a kill at any point, leaves the old checkpoint or the new one and never a
    mix."""
    target = os.path.realpath(save_directory)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    remove_stale_staging(parent)
    # made as os.makedirs makes folders (umask, inherited group), since a new checkpoint folder is this one renamed
    staging = os.path.join(parent, staging_name())
    os.mkdir(staging)
    try:
        write(staging)
        give_default_permissions(staging)
        if not os.path.exists(target):  # a new folder appears whole, in one rename
            try:
                os.rename(staging, target)
                return
            except OSError:  # made by someone else meanwhile: written into below
                pass
        carry_over(target, staging, drop)
        if exchange(staging, target):  # the staging path now holds the old folder, removed below
            return
        # no atomic exchange on this system: file by file, the weights last, so that until then the folder holds
        # the previous checkpoint's weights
        names = sorted(os.listdir(staging), key=lambda name: name.endswith(".safetensors"))
        for name in names:
            if os.path.isfile(os.path.join(staging, name)):
                os.replace(os.path.join(staging, name), os.path.join(target, name))
        for name in drop:
            if os.path.isfile(os.path.join(target, name)):
                os.remove(os.path.join(target, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["give_default_permissions", "write_atomically"]
