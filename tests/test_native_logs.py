"""Native stderr: TensorFlow's start-up chatter is filtered out, real native errors reach the user."""

import os
import signal
import subprocess
import sys
import textwrap

CHATTER_SEEN = ("oneDNN custom operations", "Could not find cuda drivers", "absl::InitializeLog", "cuInit",
                "rebuild TensorFlow with the appropriate compiler flags")


def _run(code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "UNETPP_TF_NATIVE_LOGS"}  # that one shows everything
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300, env=env
    )


def test_a_native_fatal_error_inside_the_command_line_reaches_stderr():
    # A C-level write to descriptor 2 and an abort, as a failed CHECK in TensorFlow's runtime does,
    # from inside a command (the summary command's model builder).
    result = _run(
        """
        import ctypes, sys
        import unetpp_tf.models
        from unetpp_tf import cli

        def failing_builder(*args, **kwargs):
            libc = ctypes.CDLL(None)
            line = b"F0000 00:00:1700000000.000000   42 check_op.cc:12] Check failed: 2 == 3 (native test failure)\\n"
            libc.write(2, line, len(line))
            libc.abort()

        unetpp_tf.models.build_model = failing_builder
        sys.exit(cli.main(["summary", "--depth", "2", "--filters", "4"]))
        """
    )
    assert result.returncode == -signal.SIGABRT
    assert "check_op.cc:12] Check failed: 2 == 3 (native test failure)" in result.stderr
    assert not [text for text in CHATTER_SEEN if text in result.stderr], result.stderr


def test_the_filter_drops_start_up_chatter_and_keeps_errors_in_order():
    result = _run(
        """
        import ctypes, sys
        from unetpp_tf._native_logs import native_stderr_silenced

        libc = ctypes.CDLL(None)

        def native(text):
            line = text.encode() + b"\\n"
            libc.write(2, line, len(line))

        with native_stderr_silenced():
            native("I0000 00:00:1700000000.000000   42 port.cc:153] oneDNN custom operations are on.")
            native("E0000 00:00:1700000000.000000   42 cuda_platform.cc:52] failed call to cuInit: UNKNOWN ERROR (303)")
            native("W0000 00:00:1700000000.000000   42 allocator.cc:122] Allocation of 4096 exceeds 10% of memory.")
            print("python line", file=sys.stderr, flush=True)
            with native_stderr_silenced():  # nested: the outer filter serves
                native("E0000 00:00:1700000000.000000   42 op.cc:1] Resource exhausted: OOM allocating tensor")
            for k in range(3000):  # more than a pipe holds: nothing is lost or reordered
                native(f"bulk {k}")
        print("after the block", file=sys.stderr)
        """
    )
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    assert lines[:3] == [
        "W0000 00:00:1700000000.000000   42 allocator.cc:122] Allocation of 4096 exceeds 10% of memory.",
        "python line",
        "E0000 00:00:1700000000.000000   42 op.cc:1] Resource exhausted: OOM allocating tensor",
    ]
    assert lines[3:-1] == [f"bulk {k}" for k in range(3000)]
    assert lines[-1] == "after the block"


def test_import_filters_native_chatter_but_keeps_python_logging():
    result = _run(
        """
        import sys
        import unetpp_tf, tensorflow as tf
        tf.get_logger().warning('python warning after import')
        print('python stderr line', file=sys.stderr)
        """
    )
    assert result.returncode == 0, result.stderr
    assert "python warning after import" in result.stderr and "python stderr line" in result.stderr
    assert "Logging error" not in result.stderr  # the handler made during import still writes
    assert not [text for text in CHATTER_SEEN if text in result.stderr], result.stderr
