"""Thread-safe compile cache: one compiled kernel per KernelSpec, compiled at most once.

Lookups are a dict read (no lock); a miss takes the lock, so concurrent first calls for the same
variant build it once and the others wait for that result. A miss looks in the on-disk cache
(flashgdn.disk_cache) before it compiles, and stores what it compiles there, so that other
processes and later runs load the variant instead of compiling it. A function loaded from disk
is a plain tvm_ffi.Function: it takes its arguments by position, as the API passes them (a freshly
compiled one also takes them by name).
"""
from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Optional

from .disk_cache import DiskCache
from .spec import KernelSpec


class CompileCache:
    def __init__(self, compile_fn: Callable[[KernelSpec], Callable], disk: Optional[DiskCache] = None):
        self._compile_fn = compile_fn
        self._disk = disk  # None: memory only
        self._fns: Dict[KernelSpec, Callable] = {}
        self._lock = threading.Lock()
        self.compiles = 0  # how many times compile_fn ran (tests check recompiles)
        self.disk_loads = 0  # how many variants came from the disk cache

    def get(self, spec: KernelSpec) -> Callable:
        fn = self._fns.get(spec)
        if fn is None:
            with self._lock:
                fn = self._fns.get(spec)
                if fn is None:
                    fn = self._build(spec)
                    self._fns[spec] = fn
        return fn

    def _build(self, spec: KernelSpec) -> Callable:
        disk = self._disk if self._disk is not None and self._disk.enabled else None
        if disk is not None:
            fn = disk.load(spec)
            if fn is not None:
                self.disk_loads += 1
                return fn
        start = time.perf_counter()
        fn = self._compile_fn(spec)
        self.compiles += 1
        if disk is not None:
            disk.store(spec, fn, compile_s=time.perf_counter() - start)
        return fn

    @property
    def disk(self) -> Optional[DiskCache]:
        return self._disk

    def __len__(self) -> int:
        return len(self._fns)

    def clear(self) -> None:
        """Forget the compiled functions of this process (the disk cache keeps its entries)."""
        with self._lock:
            self._fns.clear()


def compile_variant(spec: KernelSpec) -> Callable:
    """Compile `spec` with CuTe DSL (no GPU needed)."""
    from .kernels.build import compile_kernel  # the kernel layer loads CuTe DSL on first use

    return compile_kernel(spec)


kernel_cache = CompileCache(compile_variant, disk=DiskCache())
