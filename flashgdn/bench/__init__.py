"""Benchmark support: timing core, metrics and the flashgdn-bench CLI."""
