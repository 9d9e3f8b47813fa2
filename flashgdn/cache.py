"""Thread-safe compile cache: one compiled kernel per KernelSpec, compiled at most once.

Lookups are a dict read (no lock); a miss takes the lock, so concurrent first calls for the same
variant compile it once and the others wait for that result.
"""
from __future__ import annotations

import threading
from typing import Callable, Dict

from .spec import KernelSpec


class CompileCache:
    def __init__(self, compile_fn: Callable[[KernelSpec], Callable]):
        self._compile_fn = compile_fn
        self._fns: Dict[KernelSpec, Callable] = {}
        self._lock = threading.Lock()
        self.compiles = 0  # how many times compile_fn ran (tests check recompiles)

    def get(self, spec: KernelSpec) -> Callable:
        fn = self._fns.get(spec)
        if fn is None:
            with self._lock:
                fn = self._fns.get(spec)
                if fn is None:
                    fn = self._compile_fn(spec)
                    self.compiles += 1
                    self._fns[spec] = fn
        return fn

    def __len__(self) -> int:
        return len(self._fns)

    def clear(self) -> None:
        with self._lock:
            self._fns.clear()


def _compile(spec: KernelSpec) -> Callable:
    from .kernels.build import compile_kernel  # the kernel layer loads CuTe DSL on first use

    return compile_kernel(spec)


kernel_cache = CompileCache(_compile)
