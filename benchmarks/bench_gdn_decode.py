"""Benchmark the flashgdn GDN decode kernels (same as the `flashgdn-bench` console script).

    python benchmarks/bench_gdn_decode.py --help
"""
from flashgdn.bench.cli import main

raise SystemExit(main())
