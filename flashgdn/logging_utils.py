"""Opt-in API call logging: FLASHGDN_LOGLEVEL=1 logs calls, 2 adds shapes/dtypes/strides.

The variable is read once, at import, and only decides whether `logged` wraps the API functions:
unset or 0, `logged` returns the function itself (zero overhead). Like any library, flashgdn
configures no output: the "flashgdn" logger gets a NullHandler and no level, and its records
propagate to the application's handlers. The call records are INFO records, so an application
shows them with e.g.

    logging.basicConfig(level=logging.INFO)            # or
    logging.getLogger("flashgdn").setLevel(logging.INFO)  # plus a handler of its own
"""
from __future__ import annotations

import functools
import logging
import os

import torch

LOG_LEVEL = int(os.environ.get("FLASHGDN_LOGLEVEL", "0") or 0)
logger = logging.getLogger("flashgdn")
# A reload of this module must not stack a second NullHandler.
if not any(isinstance(h, logging.NullHandler) for h in logger.handlers):
    logger.addHandler(logging.NullHandler())


def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        stride = tuple(x.stride()) if hasattr(x, "stride") else ()
        return f"Tensor(shape={tuple(x.shape)}, dtype={x.dtype}, stride={stride}, device={x.device})"
    return repr(x)


def logged(fn):
    """`fn` itself when FLASHGDN_LOGLEVEL is unset or 0, else `fn` wrapped to log each call at INFO."""
    if LOG_LEVEL <= 0:
        return fn

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if torch.compiler.is_compiling():  # a log call would break the traced graph
            return fn(*args, **kwargs)
        if LOG_LEVEL >= 2:
            parts = [_describe(a) for a in args] + [f"{k}={_describe(v)}" for k, v in kwargs.items()]
            logger.info("%s(%s)", fn.__name__, ", ".join(parts))
        else:
            logger.info("%s", fn.__name__)
        return fn(*args, **kwargs)

    return wrapper
