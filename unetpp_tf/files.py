"""Writing files so that a kill or a full disk at any instant leaves a loadable state.

Every file the library writes (checkpoints, backups, the best model, exports, predictions,
metrics) goes through `atomic_write`: it is written under a temporary name in the same
folder, flushed to disk, and renamed over the final name with `os.replace`, which is atomic
on POSIX and Windows. A reader therefore sees either the previous file or the new one,
never a half-written one. `staged_writes` does the same for a group of files.

Example:
    >>> atomic_write("run/metrics.json", lambda temp: Path(temp).write_text("{}"))
    >>> write_json("run/best.json", {"best": 0.91})
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable

PARTIAL_PREFIX = ".partial-"


def temporary_name(path: str | os.PathLike) -> Path:
    """A fresh hidden name beside `path` that keeps its suffixes (`.keras`, `.weights.h5`).

    Keras picks the format from the suffix, so the temporary file of `model.keras` must
    end in `.keras` too.

    Example:
        >>> temporary_name("run/model.keras").name   # e.g. '.partial-3f2a9c1e-model.keras'
    """
    path = Path(path)
    return path.with_name(f"{PARTIAL_PREFIX}{uuid.uuid4().hex[:8]}-{path.name}")


def _fsync(path: Path) -> None:
    """Flush a written file (or every file of a written folder) to the disk."""
    files = [p for p in path.rglob("*") if p.is_file()] if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_error(path: str | os.PathLike, error: OSError) -> OSError:
    """A clear error for a failed write of `path`: full disk, permissions, or other.

    The returned error is of the same kind (`PermissionError` stays one) and names the file.

    Example:
        >>> raise write_error("run/model.keras", error) from error
    """
    if error.errno == errno.ENOSPC:
        message = (f"no space left on the device while writing {path}; the previous version of it "
                   "(if any) is intact. Free some space and run again (training: add --resume).")
    elif isinstance(error, PermissionError) or error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        message = f"cannot write {path}: permission denied ({error.strerror}); choose a writable folder."
    else:
        message = f"cannot write {path}: {error.strerror or error}."
    kind = PermissionError if isinstance(error, PermissionError) else OSError
    new = kind(message)
    new.errno, new.filename = error.errno, str(path)
    return new


def atomic_write(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Write `path` through `write(temporary_path)` and rename it into place.

    If `write` raises (or the process dies), the final path keeps its previous content and
    the temporary file is removed (a killed process can leave a hidden `.partial-*` file,
    never a broken final one). A full disk or a read-only folder raises an `OSError` that
    names the file.

    Args:
        path: str or Path. The final file (or folder, e.g. a SavedModel).
        write: callable. Writes the content to the path it is given.

    Returns:
        Path: `path`.

    Example:
        >>> atomic_write("run/model.keras", model.save)
        >>> atomic_write("run/backup/latest.weights.h5", model.save_weights)
    """
    path = Path(path)
    temp = temporary_name(path)
    try:
        write(temp)
        _fsync(temp)
        os.replace(temp, path)
    except OSError as error:
        _remove(temp)
        raise write_error(path, error) from error
    except BaseException:
        _remove(temp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    """`atomic_write` of a UTF-8 text file.

    Example:
        >>> write_text("run/notes.txt", "trained on 96 tiles\\n")
    """
    return atomic_write(path, lambda temp: Path(temp).write_text(text, encoding="utf-8"))


def write_json(path: str | os.PathLike, value) -> Path:
    """`atomic_write` of `value` as indented JSON.

    Example:
        >>> write_json("run/best.json", {"best": 0.91, "epoch": 7})
    """
    return write_text(path, json.dumps(value, indent=2) + "\n")


@contextlib.contextmanager
def staged_writes(directory: str | os.PathLike):
    """Write files under temporary names in `directory`; move them all into place on success.

    Yields `stage(final_path, write)`, where `write(temp_path)` writes the file. If the block
    raises, every staged file is removed and no final path is touched.

    Args:
        directory: str or Path. Folder of the final files (temporary files go there too, so
            `os.replace` is atomic).

    Example:
        >>> with staged_writes("out") as stage:
        ...     stage("out/a.txt", lambda tmp: Path(tmp).write_text("a"))
    """
    staged = []

    def stage(final, write):
        temp = temporary_name(Path(directory) / Path(final).name)
        staged.append((temp, Path(final)))
        try:
            write(temp)
        except OSError as error:
            raise write_error(final, error) from error

    try:
        yield stage
    except BaseException:
        for temp, _ in staged:
            _remove(temp)
        raise
    for temp, final in staged:
        os.replace(temp, final)
