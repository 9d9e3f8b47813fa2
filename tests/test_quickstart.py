"""examples/quickstart.py runs as a newcomer runs it: `python examples/quickstart.py`, exit status 0.

Without a supported GPU it reports so and runs the reference on the CPU; on a supported GPU it
checks each of the three functions against the reference and prints an OK line for each."""
from __future__ import annotations

import pytest

from helpers import run_example, supported_gpu

FUNCTIONS = ("gated_delta_rule_decode_pretranspose", "gated_delta_rule_decode", "gated_delta_rule_mtp")


def test_quickstart_runs():
    proc = run_example("quickstart.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not supported_gpu():
        assert "No supported GPU" in proc.stdout, proc.stdout
        for name in FUNCTIONS:
            assert f"reference.{name}: output" in proc.stdout, proc.stdout


@pytest.mark.gpu
def test_quickstart_checks_every_function_on_the_gpu():
    proc = run_example("quickstart.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    for name in FUNCTIONS:
        assert any(line.startswith(f"OK   {name}:") for line in lines), proc.stdout
    assert not any(line.startswith("FAIL") for line in lines), proc.stdout
    assert proc.stdout.count("first call (compiles)") == len(FUNCTIONS), proc.stdout
