"""Opt-in API call logging: FLASHGDN_LOGLEVEL=1 logs calls, 2 adds shapes/dtypes/strides.

Read once at import. When unset or 0, `logged` returns the function itself: zero overhead.
"""
from __future__ import annotations

import functools
import logging
import os

LOG_LEVEL = int(os.environ.get("FLASHGDN_LOGLEVEL", "0") or 0)
logger = logging.getLogger("flashgdn")


def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        stride = tuple(x.stride()) if hasattr(x, "stride") else ()
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, stride={stride}, device={x.device})"
    return repr(x)


def logged(fn):
    if LOG_LEVEL <= 0:
        return fn
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[flashgdn] %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if LOG_LEVEL >= 2:
            parts = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
            logger.info("%s(%s)", fn.__name__, ", ".join(parts))
        else:
            logger.info("%s", fn.__name__)
        return fn(*args, **kwargs)

    return wrapper
