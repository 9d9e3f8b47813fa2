"""The repeated-call path in C++ (FLASHGDN_HOST=1): csrc/host.cpp, built on first use.

Python's fast path (flashgdn.fastpath) still costs about 2 µs per call of key building, lookup and
calls on top of the compiled function (RESULTS.md "Host time per call"). With FLASHGDN_HOST=1 a call
site first hands all of its arguments to csrc/host.cpp, which looks their whole signature up (every
fact of the fast key and more: per tensor its dtype, device, sizes and strides), allocates the output
and calls the compiled function that a call of that signature ran; a miss returns None and the call
goes the Python way, which then remembers its function here (`remember`). The extension is built
with torch.utils.cpp_extension (a C++ compiler and ninja; its build directory is torch's extension
cache) the first time a call needs it; where the build fails, the Python way serves every call.

Served: flashgdn.api's FlashInfer functions (pretranspose, K-major decode, MTP). Off by default: the
first build takes 15-60 s. Each public function calls EXT.call itself, right after its tracing check:
a Python helper in between cost about 0.2 µs per call on the CPU, a fifth of the whole path.
"""
from __future__ import annotations

import os
import warnings
from typing import Any, Optional, Sequence

from .spec import AFTER_OUTPUT, AFTER_REPLAY
from .validation import MEMO_MAX

ENABLED = os.environ.get("FLASHGDN_HOST", "0") not in ("", "0")

# The call sites: one table each.
PRETRANSPOSE, DECODE, MTP = range(3)
OUTPUT, NONE = -2, -1  # in a launch or return template: the output, None

# Where each site's launch arguments (KernelArgs' order: the state at 7) come from: indices into the
# arguments its public function hands to EXT.call (its private function's order), NONE, OUTPUT. A
# pretranspose call's pool is `state` (3) or `initial_state` (11): keyed by `initial_state is None`.
PRETRANSPOSE_LAUNCH = {dense: (0, 1, 2, 5, 7, 4, 6, 3 if dense else 11, 12, 13, NONE, 14, OUTPUT)
                       + (NONE,) * len(AFTER_OUTPUT) for dense in (True, False)}
DECODE_LAUNCH = (0, 1, 2, 5, 7, 4, 6, 3, NONE, NONE, NONE, NONE, OUTPUT) + (NONE,) * len(AFTER_OUTPUT)
MTP_LAUNCH = (0, 1, 2, 6, 8, 5, 7, 3, 4, 15, 16, 11, OUTPUT, 12, NONE, 20, 21, 22, 23) + (NONE,) * len(AFTER_REPLAY)

# The built extension: set by the first `remember` (a call that ran the Python way); the call sites
# try it first while it is set.
EXT: Any = None
_built: Any = None  # the extension once built, whether or not EXT is set
_failed = False


def extension() -> Optional[Any]:
    """The built extension, or None while FLASHGDN_HOST is off or where it does not build (warned once)."""
    global EXT, _built, _failed
    if EXT is None and ENABLED and not _failed:
        try:
            from torch.utils.cpp_extension import load

            source = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "host.cpp")
            if _built is None:
                _built = load("flashgdn_host", [source], extra_cflags=["-O2"], verbose=False)
                _built.set_max_entries(MEMO_MAX)  # each site's table bounded as fastpath.FAST is
            EXT = _built
        except Exception as exc:  # no compiler or ninja: the Python way serves every call
            _failed = True
            warnings.warn(f"flashgdn: FLASHGDN_HOST=1 but its extension does not build ({exc}); "
                          "the Python fast path serves every call", RuntimeWarning, stacklevel=2)
    return EXT


def remember(site: int, fn, launch: Sequence[int], ret: Sequence[int], output: int, like: int, *args) -> None:
    """Later calls at `site` with the signature of `args` run `fn` with the launch arguments `launch`
    (indices into `args`, NONE, OUTPUT) and return `ret`; the output is args[output], or when that is
    None a new tensor like args[like] (packed, fastpath.output's rule)."""
    ext = extension()
    if ext is not None:
        ext.remember(site, fn, launch, ret, output, like, *args)


def forget() -> None:
    """Drop every entry (with fastpath.FAST: a table switch, the memo's bound), also of an extension
    built but not in use (EXT None)."""
    if _built is not None:
        _built.forget()
