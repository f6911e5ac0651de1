"""Keep TensorFlow's native (C++) start-up chatter off the terminal.

TensorFlow's C++ runtime writes informational lines (oneDNN notices, "could not find
cuda drivers", ...) straight to file descriptor 2 before any Python setting can stop
them. `native_stderr_silenced()` points descriptor 2 at /dev/null for its duration while
Python's `sys.stderr` keeps writing to the real stderr, so warnings, tracebacks and our
own messages still show. Set UNETPP_TF_NATIVE_LOGS=1 to see everything.
"""

from __future__ import annotations

import contextlib
import os
import sys

# Python-level stderr while descriptor 2 is silenced. Handlers created meanwhile (TensorFlow
# makes its logger's handler on import) keep this object, so it stays open for the process.
_python_stderr = {}


@contextlib.contextmanager
def native_stderr_silenced():
    """Silence native writes to descriptor 2; Python-level stderr is unaffected.

    Example:
        >>> with native_stderr_silenced():
        ...     import tensorflow
    """
    if os.environ.get("UNETPP_TF_NATIVE_LOGS") == "1":
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor (some notebooks)
        yield
        return
    python_stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    os.close(devnull)
    target = _target(saved)
    if target not in _python_stderr:
        _python_stderr[target] = os.fdopen(os.dup(saved), "w", buffering=1)
    sys.stderr = _python_stderr[target]
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = python_stderr
        os.dup2(saved, 2)
        os.close(saved)


def _target(descriptor: int) -> tuple:
    """What `descriptor` points at (device, inode), so one stream serves each target."""
    info = os.fstat(descriptor)
    return info.st_dev, info.st_ino
