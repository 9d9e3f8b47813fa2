"""The C++ repeated-call path (flashgdn.host) is off in every test but its own (tests/test_host_path.py
turns it on), whatever FLASHGDN_HOST says: the other tests pin down the Python way's steps (which
calls look a kernel up, which run the full checks). No test starts with an entry an earlier one kept:
tests replace the Python fast path's table (fastpath.FAST) with their own, and such an entry would run
that test's stand-in for a compiled function."""
import pytest

from flashgdn import host


@pytest.fixture(autouse=True)
def _host_path_off(monkeypatch):
    monkeypatch.setattr(host, "ENABLED", False)
    monkeypatch.setattr(host, "EXT", None)
    host.forget()
    yield
    host.forget()
