"""Atomic file output: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import contextlib
import os
import re
import tempfile

# atomic_path's temporary files: ".<name>.<8 random chars><extension of name>".
_TEMPORARY = re.compile(r"^\.(?P<base>.+)\.[a-z0-9_]{8}(?P<ext>\.[^.]*)?$")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path beside ``path``; renames it over ``path`` on success.

    Works for writers that want a file name (matplotlib, numpy); on error the temporary
    file is removed and ``path`` is untouched.
    """
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    base = os.path.basename(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{base}.", suffix=os.path.splitext(base)[1], dir=directory)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def atomic_write_text(path: str, text: str) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w") as f:
            f.write(text)


def remove_stale_temporaries(directory: str, skip: tuple[str, ...] = ()) -> list[str]:
    """Removes the temporary files that writes killed mid-way left under ``directory``.

    A process killed inside ``atomic_path`` (SIGKILL, power loss) leaves its hidden
    temporary file behind, never a half-written target. Call this when a run starts on an
    existing directory, while no other process writes there. ``skip`` names
    subdirectories to leave alone. Returns the removed paths.
    """
    removed = []
    for root, dirs, files in os.walk(directory):
        if root == directory:
            dirs[:] = [d for d in dirs if d not in skip]
        for name in files:
            match = _TEMPORARY.match(name)
            if match and (match["ext"] or "") == os.path.splitext(match["base"])[1]:
                path = os.path.join(root, name)
                with contextlib.suppress(FileNotFoundError):
                    os.remove(path)
                    removed.append(path)
    return removed
