"""examples/quickstart.py runs as a newcomer runs it: `python examples/quickstart.py`, exit status 0.

Without a supported GPU it reports so and runs the reference on the CPU; on a supported GPU it
checks each of the three functions against the reference and prints an OK line for each."""
from __future__ import annotations

import functools
import pathlib
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"
FUNCTIONS = ("gated_delta_rule_decode_pretranspose", "gated_delta_rule_decode", "gated_delta_rule_mtp")


@functools.lru_cache(maxsize=None)
def run_quickstart() -> subprocess.CompletedProcess:
    """One run per test session (on a GPU it compiles three kernels), shared by the tests below."""
    return subprocess.run([sys.executable, str(SCRIPT), "--seed", "0"], capture_output=True, text=True,
                          timeout=600)


def supported_gpu() -> bool:
    from flashgdn.device import unavailable_reason

    return unavailable_reason() is None


def test_quickstart_runs():
    proc = run_quickstart()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not supported_gpu():
        assert "No supported GPU" in proc.stdout, proc.stdout
        for name in FUNCTIONS:
            assert f"reference.{name}: output" in proc.stdout, proc.stdout


@pytest.mark.gpu
def test_quickstart_checks_every_function_on_the_gpu():
    proc = run_quickstart()
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in FUNCTIONS:
        assert any(line.startswith(f"OK   {name}:") for line in lines), proc.stdout
    assert not any(line.startswith("FAIL") for line in lines), proc.stdout
    assert proc.stdout.count("first call (compiles)") == len(FUNCTIONS), proc.stdout
