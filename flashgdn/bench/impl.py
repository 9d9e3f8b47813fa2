"""What every benchmark implementation shares (flashgdn.bench.rows and .engine_rows): the Impl
record, the value its collect step returns, and the exception that says it cannot run a row."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional, Tuple

import torch


class Unavailable(Exception):
    """An implementation that cannot run this row here (missing package, other signature)."""


# output, state rows, and a third tensor (intermediate states; the conv state rows of a fused step)
Collected = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]


@dataclasses.dataclass(frozen=True)
class Impl:
    """One implementation. `prepare(row, inp)` does the untimed set-up and returns
    (call, collect): `call()` is what is timed; `collect(call())` gives what --verify compares.
    `note(row)` says what a row that ran should know about how it ran (None: nothing). A baseline
    that does not `apply(row)` (the composed fused-step path on a decode row) is left out of the
    row: no time, no note."""

    name: str
    prepare: Callable[[Any, dict], Tuple[Callable[[], Any], Callable[[Any], Collected]]]
    note: Callable[[Any], Optional[str]] = lambda row: None
    applies: Callable[[Any], bool] = lambda row: True
