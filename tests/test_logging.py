"""flashgdn logs like a library: a NullHandler, no level, records propagate to the application's
handlers. Each case runs in a fresh interpreter because FLASHGDN_LOGLEVEL is read at import."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import pytest

# Decorates a dummy function with `logged` and calls it once; BASIC_CONFIG is filled in per case.
SCRIPT = """
import logging, sys
{basic_config}
from flashgdn.logging_utils import logged

def dummy(x, y=2):
    return x + y

wrapped = logged(dummy)
print("same" if wrapped is dummy else "wrapped")
assert wrapped(1, y=3) == 4
"""
BASIC_CONFIG = "logging.basicConfig(level=logging.INFO, stream=sys.stdout, format='%(name)s|%(message)s')"


def run(level, basic_config: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FLASHGDN_LOGLEVEL"}
    if level is not None:
        env["FLASHGDN_LOGLEVEL"] = level
    code = textwrap.dedent(SCRIPT).format(basic_config=BASIC_CONFIG if basic_config else "")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res


@pytest.mark.parametrize("level, message", [("1", "flashgdn|dummy"), ("2", "flashgdn|dummy(1, y=3)")])
def test_call_logged_once_under_basic_config(level, message):
    res = run(level, basic_config=True)
    lines = res.stdout.splitlines()
    assert lines[0] == "wrapped"
    calls = [ln for ln in lines if ln.startswith("flashgdn|")]
    assert calls == [message], res.stdout  # exactly once: no handler of flashgdn's own
    assert "dummy" not in res.stderr


@pytest.mark.parametrize("level", [None, "0"])
def test_unset_returns_the_function_itself(level):
    assert run(level, basic_config=False).stdout.splitlines() == ["same"]


def test_no_output_without_application_logging_config():
    """The NullHandler keeps logging's last-resort handler (and 'No handlers could be found') silent."""
    res = run("1", basic_config=False)
    assert res.stdout.splitlines() == ["wrapped"]
    assert res.stderr == ""


def test_logger_is_configured_like_a_library():
    from flashgdn import logging_utils

    logger = logging.getLogger("flashgdn")
    assert logging_utils.logger is logger
    assert any(isinstance(h, logging.NullHandler) for h in logger.handlers)
    assert not [h for h in logger.handlers if not isinstance(h, logging.NullHandler)]
    assert logger.level == logging.NOTSET and logger.propagate
