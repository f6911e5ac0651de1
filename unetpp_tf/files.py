"""Writing files so that a kill or a full disk at any instant leaves a loadable state.

Every file the library writes (checkpoints, backups, the best model, exports, predictions,
metrics) goes through `atomic_write`: it is written under a temporary name in the same
folder, flushed to disk, and renamed over the final name with `os.replace`, which is atomic
on POSIX and Windows. A reader therefore sees either the previous file or the new one,
never a half-written one. `staged_writes` does the same for a group of files, and
`staged_directory` for a whole folder (an export): it is built beside the old one and swapped in.

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
import warnings
from pathlib import Path
from typing import Callable

PARTIAL_PREFIX = ".partial-"
PREVIOUS_PREFIX = ".previous-"  # a folder swapped out by `staged_directory`, kept until the swap is done
# errno values of a failed write (as opposed to a failed read): these become `write_error`s.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EACCES, errno.EPERM, errno.EROFS}


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
    new.errno = error.errno  # not .filename: with it set, str(new) would be "[Errno N] None: 'path'"
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


def require_writable(directory: str | os.PathLike) -> None:
    """Raise `write_error`'s `PermissionError` naming `directory` when it exists but is read-only.

    Example:
        >>> require_writable("masks")   # before any work whose results go there
    """
    directory = Path(directory)
    if directory.is_dir() and not os.access(directory, os.W_OK | os.X_OK):
        error = PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(directory))
        raise write_error(directory, error) from None


def _nearest_existing(path: Path) -> Path:
    while not path.exists() and not path.is_symlink():
        path = path.parent
    return path


def _previous_folders(directory: Path) -> list:
    """`.previous-<8 hex>-<name>` siblings of `directory` left by an interrupted swap."""
    if not directory.parent.is_dir():
        return []
    suffix = f"-{directory.name}"
    return [
        entry for entry in directory.parent.iterdir()
        if entry.name.startswith(PREVIOUS_PREFIX) and entry.name[len(PREVIOUS_PREFIX) + 8:] == suffix
    ]


def _restore_interrupted(directory: Path) -> None:
    """Undo a swap that a kill stopped between its two renames: put the previous folder back."""
    previous = _previous_folders(directory)
    if previous and not directory.exists() and not directory.is_symlink():
        os.replace(previous.pop(), directory)
    for stale in previous:  # the swap finished; only its clean-up was cut short
        _discard(stale)


def _discard(path: Path) -> None:
    """Remove a folder: first renamed to a `.partial-` name, so a half-deleted one is never restored."""
    trash = temporary_name(path)
    os.replace(path, trash)
    _remove(trash)


def _link_or_copy(source, target) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _carry_over(old: Path, staging: Path) -> None:
    """Link the entries of `old` that `staging` lacks into it (files hard-linked, else copied)."""
    for entry in old.iterdir():
        target = staging / entry.name
        if target.exists() or target.is_symlink():
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), target)
        elif entry.is_dir():
            shutil.copytree(entry, target, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, target)


def _swappable(directory: Path) -> bool:
    """Whether `directory` can be replaced by renaming (else its entries are replaced one by one)."""
    if not directory.exists():
        return True
    resolved, cwd = directory.resolve(), Path.cwd().resolve()
    in_use = cwd == resolved or resolved in cwd.parents  # renaming it would move the working folder
    linked = directory.is_symlink()  # renaming would replace the link, not the folder it points to
    return not (in_use or linked or os.path.ismount(directory) or not os.access(directory.parent, os.W_OK | os.X_OK))


def _replace_entries(staging: Path, directory: Path) -> None:
    """Move every entry of `staging` into `directory`, all or nothing if a move fails."""
    previous = staging / f"{PREVIOUS_PREFIX}entries"
    previous.mkdir()
    moved, replaced = [], []
    try:
        for entry in [e for e in staging.iterdir() if e != previous]:
            target = directory / entry.name
            if target.exists() or target.is_symlink():
                os.replace(target, previous / entry.name)
                replaced.append(entry.name)
            os.replace(entry, target)
            moved.append(entry.name)
    except OSError:
        for name in moved:
            _remove(directory / name)
        for name in replaced:
            os.replace(previous / name, directory / name)
        raise


@contextlib.contextmanager
def staged_directory(directory: str | os.PathLike):
    """Build a new version of folder `directory` in a hidden sibling; swap it in whole on success.

    Yields the staging folder (empty): write the new entries there. When the block ends
    without error, the entries of the current `directory` that the block did not write are
    linked in (kept), every file is flushed to disk, and two renames swap the folders
    (`directory` to a hidden `.previous-*` sibling, the staging folder to `directory`) before
    the previous folder is deleted. A reader, or a kill at any instant, therefore finds the
    old folder, the new one, or (between the two renames) none: the next call on `directory`
    puts the old one back. If the block raises, the staging folder is removed and `directory`
    is untouched; missing parent folders are only created by the swap. A full disk or a
    read-only `directory` (checked first: the swap could otherwise replace it) raises
    `write_error`'s message naming `directory`.

    The working folder (or one holding it), a symbolic link, a mount point, or a folder whose
    parent is read-only cannot be renamed: there the staging folder goes inside `directory` and its
    entries replace the old ones one by one (a kill during those renames can leave old and
    new entries side by side), with one warning.

    Args:
        directory: str or Path. The folder to replace (created when missing).

    Example:
        >>> with staged_directory("export") as staging:
        ...     model.save(staging / "model.keras")
        ...     write_json(staging / "report.json", {"ok": True})
    """
    directory = Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise NotADirectoryError(f"{directory} exists and is not a folder; pass a folder path.")
    anchor = _nearest_existing(directory.parent)  # the staging folder goes there, beside the final one
    if not anchor.is_dir():
        raise NotADirectoryError(f"cannot create folder {directory}: {anchor} is a file, not a folder.")
    require_writable(directory)
    try:
        _restore_interrupted(directory)
        swap = _swappable(directory)
        if not swap:
            warnings.warn(
                f"{directory} is the working folder, a link, a mount point or in a read-only folder: its "
                "entries are replaced one by one instead of swapping the whole folder.",
                stacklevel=3,
            )
        staging = temporary_name((anchor if swap else directory) / directory.name)
        staging.mkdir()
    except OSError as error:
        raise write_error(directory, error) from error
    try:
        yield staging
        if swap and directory.exists():
            shutil.copymode(directory, staging)
            _carry_over(directory, staging)
        _fsync(staging)
        if not swap:
            _replace_entries(staging, directory)
        elif directory.exists():
            previous = directory.with_name(f"{PREVIOUS_PREFIX}{uuid.uuid4().hex[:8]}-{directory.name}")
            os.replace(directory, previous)
            os.replace(staging, directory)
            _discard(previous)
        else:
            created = [p for p in directory.parents if not p.exists()]
            try:
                directory.parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging, directory)
            except OSError:
                for folder in created:  # deepest first
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise
    except OSError as error:
        if error.errno in _WRITE_ERRNOS:
            raise write_error(directory, error) from error
        raise
    finally:
        if staging.exists():
            _remove(staging)
