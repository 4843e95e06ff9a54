"""Writing a folder so that no reader ever sees it half-written: everything goes to a staging folder beside it first.

This is a Hub code file: it imports only the standard library.
"""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Callable


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


def write_atomically(save_directory: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Runs `write(folder)` on a fresh temporary folder beside `save_directory`, then moves what it wrote into place
    (the whole folder when `save_directory` is new, else file by file, keeping other files there): a failure while
    writing leaves no half-written checkpoint."""
    parent = os.path.dirname(os.path.abspath(save_directory))
    os.makedirs(parent, exist_ok=True)
    # made as os.makedirs makes folders (umask, inherited group), since a new checkpoint folder is this one renamed
    staging = os.path.join(parent, f".vptm-save-{os.urandom(8).hex()}")
    os.mkdir(staging)
    try:
        write(staging)
        give_default_permissions(staging)
        if not os.path.exists(save_directory):  # a new folder appears whole, in one rename
            try:
                os.replace(staging, save_directory)
                return
            except OSError:  # made by someone else meanwhile: move file by file below
                pass
        # into an existing folder file by file, the weights last: until then it holds the previous checkpoint's
        os.makedirs(save_directory, exist_ok=True)
        names = sorted(os.listdir(staging), key=lambda name: name.endswith(".safetensors"))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(save_directory, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)


__all__ = ["give_default_permissions", "write_atomically"]
