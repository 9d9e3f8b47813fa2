"""argparse types shared by flashgdn's command-line tools (flashgdn-bench, flashgdn-precompile)."""
from __future__ import annotations

import argparse


def int_at_least(lowest: int, what: str):
    """An argparse type: an integer >= `lowest` (`what` names it in the error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"expected {what}, got {value}")
        return value

    return parse


positive_int = int_at_least(1, "a positive integer")
