"""Keep TensorFlow's native start-up chatter off the terminal, and every other native line on it.

TensorFlow's C++ runtime writes informational lines (the oneDNN notice, "Could not find
cuda drivers", a failed cuInit on a machine without a GPU, ...) straight to file descriptor
2, before any Python setting can stop them. `native_stderr_silenced()` passes descriptor 2
through a line filter for its duration: the known start-up lines (`CHATTER`) are dropped and
every other line, native or Python (a CHECK failure, an out-of-memory report, a traceback),
reaches the real stderr as it comes. The filter runs in a small child process, so the last
lines of a process that crashes inside the block still come through. Set
UNETPP_TF_NATIVE_LOGS=1 to see everything.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys

# Lines dropped: absl INFO lines ("I0000 ..."), TensorFlow's start-up notices, the GPU probe of
# a machine without one, the TFLite runtime's delegate notice. Errors, warnings and fatal
# messages pass.
CHATTER = "|".join(
    (
        r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
        r"^I\d{4} \d\d:\d\d:\d\d",
        r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: I ",  # the same, as older TensorFlow versions write it
        r"^To enable the following instructions: .* in other operations, rebuild TensorFlow",
        r"^E\d{4} .* failed call to cuInit",
        r"^[EW]\d{4} .* Unable to register cu(DNN|FFT|BLAS) factory",
        r"^W\d{4} .* TF-TRT Warning: Could not find TensorRT",
        r"^INFO: Created TensorFlow Lite XNNPACK delegate for CPU\.",  # the TFLite runtime, on every interpreter
    )
)

# The child process: copy stdin to stdout line by line, minus the lines matching argv[1].
_FILTER = (
    "import os, re, signal, sys\n"
    "signal.signal(signal.SIGINT, signal.SIG_IGN)\n"  # Ctrl-C is for the parent; keep draining
    "chatter = re.compile(sys.argv[1].encode())\n"
    "for line in iter(sys.stdin.buffer.readline, b''):\n"
    "    if not chatter.search(line):\n"
    "        os.write(1, line)\n"
)

_depth = [0]  # blocks entered: an inner block inside an outer one is already filtered


@contextlib.contextmanager
def native_stderr_silenced():
    """Drop TensorFlow's start-up chatter from descriptor 2 for the block; pass every other line.

    Python's `sys.stderr` writes through the same filter, so its lines stay in order with the
    native ones. Nested blocks share the outer filter. Where descriptor 2 cannot be redirected
    (some notebook kernels) or no child process can start, the block runs unfiltered.

    Example:
        >>> with native_stderr_silenced():
        ...     import tensorflow
    """
    if os.environ.get("UNETPP_TF_NATIVE_LOGS") == "1" or _depth[0]:
        _depth[0] += 1
        try:
            yield
        finally:
            _depth[0] -= 1
        return
    started = _start_filter()
    _depth[0] += 1
    try:
        yield
    finally:
        _depth[0] -= 1
        if started is not None:
            _stop_filter(*started)


def _start_filter():
    """Point descriptor 2 at a filtering child process; returns (child, saved descriptor) or None."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real descriptor 2
        return None
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-I", "-S", "-c", _FILTER, CHATTER], stdin=read_end, stdout=saved, stderr=saved
        )
    except (OSError, ValueError):  # no interpreter to start: run unfiltered
        for descriptor in (read_end, write_end, saved):
            os.close(descriptor)
        return None
    os.close(read_end)
    os.dup2(write_end, 2)
    os.close(write_end)
    return child, saved


def _stop_filter(child: subprocess.Popen, saved: int) -> None:
    """Put the real stderr back on descriptor 2 and let the child write what it still holds."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    os.dup2(saved, 2)  # closes this process's last write end of the pipe: the child reads to its end
    os.close(saved)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=5)  # longer only when a process started inside the block still holds the pipe
