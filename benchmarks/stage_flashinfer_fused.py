"""Put FlashInfer's fused decode step (`gdn_kernels/experimental`, with the `trace` package and `fi_trace.py`
it imports) from a flashinfer-python wheel into a site folder that already holds a FlashInfer without it (a
stripped install), unmodified, so that `flashgdn-bench --api fused_step --compare` times FlashInfer's
`gdn_fused_decode_step` too (flashgdn.bench.engine_rows.FLASHINFER_FUSED_MODULES):

    pip download --no-deps flashinfer-python==0.7.2.post1 -d wheels
    python benchmarks/stage_flashinfer_fused.py wheels/flashinfer_python-0.7.2.post1-py3-none-any.whl SITE

SITE is the folder that holds the `flashinfer` package. Files already there are left as they are.
"""
from __future__ import annotations

import argparse
import sys
import zipfile
from pathlib import Path

PARTS = ("flashinfer/gdn_kernels/experimental/", "flashinfer/trace/", "flashinfer/fi_trace.py")


def stage(wheel: Path, site: Path) -> int:
    """Copy the wheel's PARTS under `site` (files already there are kept); returns how many were written."""
    if not (site / "flashinfer").is_dir():
        raise SystemExit(f"{site}: no flashinfer package there to add the fused step to")
    written = 0
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            target = site / name
            if name.endswith("/") or not name.startswith(PARTS) or target.exists():
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(zf.read(name))
            written += 1
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("wheel", type=Path, help="a flashinfer-python wheel (0.7.2 or newer)")
    p.add_argument("site", type=Path, help="the folder holding the flashinfer package")
    args = p.parse_args(argv)
    n = stage(args.wheel, args.site)
    print(f"{n} files of FlashInfer's fused decode step written under {args.site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
