"""Kernel layer: CuTe DSL kernels and their compilation (never imports torch)."""
