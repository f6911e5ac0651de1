"""Run one benchmark configuration in a fresh process, so that its peak memory is its own.

Both halves of the protocol live here: the parent calls `run_isolated(__file__, spec)`,
which starts `script --single SPEC_JSON`; the child's `main` calls `answer_single(parser,
measure)` first, which measures SPEC and prints the result as one JSON line.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys


def run_isolated(script: str, spec: dict) -> dict:
    """Run `script --single spec` in a new Python process and return its JSON result.

    Example:
        >>> run_isolated(__file__, {"size": 96, "batch": 16})
    """
    result = subprocess.run(
        [sys.executable, script, "--single", json.dumps(spec)], capture_output=True, text=True, check=False
    )
    if result.returncode != 0:
        raise RuntimeError(f"configuration {spec} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def answer_single(parser: argparse.ArgumentParser, measure) -> argparse.Namespace | None:
    """Parse the command line; in a `--single` child, print `measure(spec)` and return None.

    Example:
        >>> args = answer_single(parser, measure)
        >>> if args is None:
        ...     return
    """
    parser.add_argument("--single", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(measure(json.loads(args.single))))
        return None
    return args
