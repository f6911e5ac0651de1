"""Run one benchmark configuration in a fresh process, so that its peak memory is its own.

A script using it handles `--single SPEC_JSON` by measuring SPEC and printing the result
as one JSON line, e.g. `python benchmarks/recompute_memory.py --single '{"size": 96, ...}'`.
"""

from __future__ import annotations

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
