"""Device-table settings for side-by-side timing runs (benchmarks/fused_table.py,
benchmarks/replay_step.py): a setting changes fields of the device's policy.DeviceTable for the
calls made inside `switched`. "field=value" replaces a field; "field+={...}" adds entries to a
dict field (prefetch_bytes, commit_mma_min_tokens), keeping the device's own others.

A spec's build follows the table, but the compile caches (this process's and the disk's) key a
variant by its spec, not by the table that built it; so each setting gets a compile cache of its
own in memory, and the plans and fast-path entries the API remembers (each keeps the function an
earlier call looked up) are forgotten on the way in and out.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import dataclasses
import re

from .. import api, fastpath, fused_step
from ..cache import CompileCache
from ..kernels import policy

# A comma that starts the next field=value or field+=value: commas inside a literal (a dict, a tuple) do not.
_FIELD_SEP = re.compile(r",(?=\s*\w+\s*\+?=)")


class Added(dict):
    """The value of "field+={...}": entries added to the table's dict field, not a new dict."""


def parse_setting(text: str) -> dict:
    """"field=value[,field=value...]" (DeviceTable fields, Python literals; "field+={...}" for
    entries added to a dict field: an Added value) as a dict; "table": the device's table as it is."""
    if text == "table":
        return {}
    fields = {f.name for f in dataclasses.fields(policy.DeviceTable)}
    setting = {}
    for part in _FIELD_SEP.split(text):
        name, sep, value = part.partition("=")
        name, added = name.strip().removesuffix("+"), name.strip().endswith("+")
        if not sep or name not in fields or text.rstrip().endswith(","):
            raise argparse.ArgumentTypeError(f"a setting is field=value[,field=value...] with DeviceTable fields "
                                             f"({', '.join(sorted(fields))}), got {text!r}")
        try:
            setting[name] = ast.literal_eval(value)
        except (ValueError, SyntaxError) as exc:
            raise argparse.ArgumentTypeError(f"{part!r}: the value must be a Python literal") from exc
        if added:
            if not (isinstance(setting[name], dict) and isinstance(getattr(policy.SM90_HBM3, name), dict)):
                raise argparse.ArgumentTypeError(f"{part!r}: field+= adds a dict literal's entries to a dict field")
            setting[name] = Added(setting[name])
    return setting


def label(setting: dict) -> str:
    """The setting as it was written ("table" for none)."""
    return ",".join(f"{k}{'+' if isinstance(v, Added) else ''}={v!r}" for k, v in setting.items()) or "table"


def _forget() -> None:
    api._VALIDATED.clear()
    fused_step._VALIDATED.clear()
    fastpath.forget()


@contextlib.contextmanager
def switched(device_class: str, setting: dict, cache: CompileCache):
    """Inside: the table of `device_class` changed by `setting`, and the API's and the fused
    step's variants from `cache` (the setting's own). An empty setting changes nothing (the shared
    caches hold the table's own builds)."""
    if not setting:
        _forget()
        yield
        return
    table = policy.DEVICE_TABLES[device_class]
    shared = api.kernel_cache, fused_step.kernel_cache
    policy.DEVICE_TABLES[device_class] = dataclasses.replace(
        table, **{k: {**getattr(table, k), **v} if isinstance(v, Added) else v for k, v in setting.items()})
    api.kernel_cache = fused_step.kernel_cache = cache
    _forget()
    try:
        yield
    finally:
        policy.DEVICE_TABLES[device_class] = table
        api.kernel_cache, fused_step.kernel_cache = shared
        _forget()
