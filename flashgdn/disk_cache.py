"""On-disk cache of compiled kernel variants, shared by every process of a machine.

An engine at TP=8 starts eight processes, and each would JIT-compile every variant it uses
(0.4-3.5 s apiece). With this cache the first process to compile a variant stores it and the
others, and every later start, load it in milliseconds.

What an entry holds: the compiled TVM-FFI function exported by CuTe DSL
(`export_to_c(path, function_name=..., export_only_tvm_ffi_symbols=True)`), linked into a shared
library with the system C compiler and loaded back with `tvm_ffi.load_module`. The library
exports one TVM-FFI symbol, `__tvm_ffi_<name>`, which is the same entry point `cute.compile`
builds: the loaded function takes the same arguments in the same order and launches on the
caller's environment stream (torch's current stream). Loading a library needs neither CuTe DSL
nor a GPU, so a process whose variants all come from disk never imports the DSL. Where no C
compiler is found the entry holds the exported object file instead, which CuTe DSL's own loader
(`cutlass.cute.runtime.load_module`, in-process JIT linking) loads; that load imports the DSL.

Layout of the directory, one pair of files per variant:
    <key>.json                  metadata: the facts the key hashes, the artifact's name, size, sha256
    <key>-<sha256[:16]>.so|.o   the artifact, named by its content

The key is the sha256 of a stable text (sorted JSON) of the KernelSpec's fields plus what else
changes the generated code or the loadability of the artifact: the flashgdn version and a digest
of the kernel layer's source (so an edited kernel never loads an old build), the CuTe DSL and
TVM-FFI versions and where they are installed, CUTE_DSL_* settings, the host's machine type and
CPU features (the exported host code is compiled for the build host's CPU and may use its vector
extensions).

Filling is safe under concurrency without locks: every file is written to a temporary file in the
directory and moved into place with os.replace, the artifact first, then the metadata. An
artifact's name holds its content digest, so whichever of two racing processes moves its files
last, the metadata never names an artifact of other content (at worst a missing one, which reads
as invalid). Processes that miss the same entry at once each compile it; they store equal bytes.
A store removes the key's artifacts that its metadata no longer names. An entry whose metadata is
unreadable, whose recorded facts differ from this process's (a stale entry), or whose artifact is
missing, truncated or fails its checksum is never loaded: the caller compiles and the store
overwrites the entry. A load that fails anyway (a library that no longer links) also falls back
to compiling.

Environment: FLASHGDN_CACHE_DIR picks the directory (default $XDG_CACHE_HOME/flashgdn, else
~/.cache/flashgdn); FLASHGDN_DISK_CACHE=0 turns the cache off. Both are read at each lookup.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional, Tuple

from .spec import KernelSpec

log = logging.getLogger(__name__)

FORMAT = 1  # bump when the entry layout or the export recipe changes
OFF_VALUES = ("0", "false", "off", "no")
DSL_DISTRIBUTIONS = (
    "nvidia-cutlass-dsl", "nvidia-cutlass-dsl-libs-base", "nvidia-cutlass-dsl-libs-core",
    "nvidia-cutlass-dsl-libs-cu12", "nvidia-cutlass-dsl-libs-cu13",
)
# CUTE_DSL_* variables that leave the generated code as it is: logging, dumps, warnings, the DSL's
# own caches, and the target and TVM-FFI switches that kernels.build passes as compile options
# (which take precedence). Processes that differ only in these share entries; any other CUTE_DSL_*
# variable enters the key.
NEUTRAL_DSL_VARS = re.compile(r"CUTE_DSL_(LOG|PRINT|DUMP|KEEP|CACHE|NO_CACHE|DISABLE_FILE_CACHING|FILTER_STACKTRACE|"
                              r"SHOW_STACKTRACE|JIT_CACHE_MAX_ELEMS|JIT_TIME_PROFILING|WARNINGS|"
                              r"ENABLE_OPTIMIZATION_WARNINGS|ARCH$|ENABLE_TVM_FFI$)")
# C compilers tried, in order, to link the exported object into a shared library ($CC first).
C_COMPILERS = ("cc", "gcc", "clang")
LINK_TIMEOUT_S = 120
_ARTIFACT_NAME = re.compile(r"[0-9a-f]{64}-[0-9a-f]{16}\.(so|o)")


# ----------------------------------------------------------------------------- settings


def disk_cache_enabled() -> bool:
    return os.environ.get("FLASHGDN_DISK_CACHE", "1").strip().lower() not in OFF_VALUES


def default_directory() -> Path:
    explicit = os.environ.get("FLASHGDN_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "flashgdn"


# ----------------------------------------------------------------------------- the key


def _version(dist: str) -> Optional[str]:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _location(dist: str) -> Optional[str]:
    """Where `dist` is installed: a shared library finds the DSL's runtime library and libtvm_ffi
    by absolute run path, so two environments with equal versions keep separate entries."""
    try:
        return str(importlib.metadata.distribution(dist).locate_file(""))
    except importlib.metadata.PackageNotFoundError:
        return None


@functools.lru_cache(maxsize=1)
def _kernel_source_digest() -> str:
    """sha256 of the kernel layer's source and of spec.py: the version string stays the same
    across development edits, the source does not."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for path in sorted([root / "spec.py", *(root / "kernels").rglob("*.py")]):
        try:
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
        except OSError:
            h.update(path.name.encode() + b"\0?\0")
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def _host_cpu() -> str:
    """The host's machine type and a digest of its CPU feature flags: the exported host code is
    compiled for the build host's CPU, so a host with other extensions gets entries of its own."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        flags = platform.processor()
    return f"{sys.platform}-{platform.machine()}-{hashlib.sha256(flags.encode()).hexdigest()[:16]}"


@functools.lru_cache(maxsize=1)
def _static_environment() -> tuple:
    from . import __version__

    return (
        ("flashgdn", __version__), ("flashgdn_kernel_source", _kernel_source_digest()),
        *((d, _version(d)) for d in DSL_DISTRIBUTIONS), ("apache-tvm-ffi", _version("apache-tvm-ffi")),
        ("host", _host_cpu()),
        ("installed_at", [_location("nvidia-cutlass-dsl"), _location("apache-tvm-ffi")]),
    )


def environment_facts() -> dict:
    """Everything besides the KernelSpec that the key covers (see the module docstring)."""
    facts = dict(_static_environment())
    facts["cute_dsl_env"] = {
        k: v for k, v in sorted(os.environ.items()) if k.startswith("CUTE_DSL_") and not NEUTRAL_DSL_VARS.match(k)
    }
    return facts


def entry_facts(spec: KernelSpec) -> dict:
    """The facts an entry is valid for, as they read back from JSON (tuples become lists)."""
    facts = {"format": FORMAT, "spec": dataclasses.asdict(spec), "environment": environment_facts()}
    return json.loads(json.dumps(facts, sort_keys=True))


def _key(facts: dict) -> str:
    return hashlib.sha256(json.dumps(facts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def entry_key(spec: KernelSpec) -> str:
    """sha256 (hex) of the stable text of entry_facts(spec): the entry's file names."""
    return _key(entry_facts(spec))


# ----------------------------------------------------------------------------- export and load


def _c_compiler() -> Optional[list]:
    cc = os.environ.get("CC")
    if cc and shutil.which(shlex.split(cc)[0]):
        return shlex.split(cc)
    for name in C_COMPILERS:
        if shutil.which(name):
            return [name]
    return None


def _link_shared(obj: str, out: str, compiler: list) -> None:
    """Link the exported object into a shared library that finds the DSL's runtime library and
    libtvm_ffi through its run path, so loading it needs no DSL import."""
    from .kernels.build import runtime_libraries  # loaded already: the function came from it

    args = [*compiler, "-shared", "-o", out, obj]
    for lib in runtime_libraries():
        folder, name = os.path.split(lib)
        args += [f"-L{folder}", f"-l:{name}", f"-Wl,-rpath,{folder}"]
    subprocess.run(args, check=True, capture_output=True, text=True, timeout=LINK_TIMEOUT_S)


def export_artifact(fn, symbol: str) -> Tuple[bytes, str]:
    """(bytes, kind) of compiled function `fn` exported as `__tvm_ffi_<symbol>`: kind "so" (a
    shared library) where a C compiler links it, else "o" (the object file)."""
    with tempfile.TemporaryDirectory(prefix="flashgdn-export-") as tmp:
        obj = os.path.join(tmp, "kernel.o")
        from .kernels.build import export_object  # loaded already: the function came from it

        export_object(fn, obj, symbol)
        compiler = _c_compiler()
        if compiler is not None:
            lib = os.path.join(tmp, "kernel.so")
            try:
                _link_shared(obj, lib, compiler)
                return Path(lib).read_bytes(), "so"
            except (OSError, subprocess.SubprocessError) as exc:
                detail = getattr(exc, "stderr", "") or exc
                log.warning("flashgdn disk cache: linking with %s failed (%s); storing the object file",
                            compiler[0], str(detail).strip()[:500])
        return Path(obj).read_bytes(), "o"


def load_artifact(path: Path, kind: str, symbol: str) -> Callable:
    """The TVM-FFI function `__tvm_ffi_<symbol>` of the artifact at `path`."""
    if kind == "so":
        import tvm_ffi

        # keep_module_alive: the library stays mapped for the life of the process, as a compiled
        # function's code does.
        return tvm_ffi.load_module(str(path)).get_function(symbol)
    from .kernels.build import load_object

    return load_object(str(path), symbol)


# ----------------------------------------------------------------------------- the cache


def _write_atomic(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file beside `path`, then move it into place: a reader sees the
    old file or the new one, never part of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.suffix)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


class DiskCache:
    """Compiled variants on disk. `directory` None follows FLASHGDN_CACHE_DIR at each call and
    `enabled` None follows FLASHGDN_DISK_CACHE."""

    def __init__(self, directory: Optional[os.PathLike] = None, enabled: Optional[bool] = None):
        self._directory = None if directory is None else Path(directory)
        self._enabled = enabled
        self._warned = False

    @property
    def directory(self) -> Path:
        return default_directory() if self._directory is None else self._directory

    @property
    def enabled(self) -> bool:
        return disk_cache_enabled() if self._enabled is None else self._enabled

    def check(self, spec: KernelSpec) -> Tuple[Optional[dict], str]:
        """(metadata, "ok") for an intact entry of `spec`, else (None, why not)."""
        facts = entry_facts(spec)
        key = _key(facts)
        try:
            meta = json.loads((self.directory / f"{key}.json").read_text())
        except FileNotFoundError:
            return None, "no entry"
        except (OSError, ValueError) as exc:
            return None, f"unreadable metadata ({type(exc).__name__})"
        if not isinstance(meta, dict) or meta.get("key") != key:
            return None, "metadata of another entry"
        if meta.get("facts") != facts:
            return None, "stale entry (its recorded versions or spec differ)"
        name, kind = meta.get("artifact"), meta.get("kind")
        # The artifact must be this key's own file in this directory, whatever the metadata says.
        if kind not in ("so", "o") or not isinstance(name, str) or not re.fullmatch(
                rf"{key}-[0-9a-f]{{16}}\.{kind}", name):
            return None, "metadata names no artifact of this entry"
        try:
            data = (self.directory / name).read_bytes()
        except OSError as exc:
            return None, f"unreadable artifact ({type(exc).__name__})"
        if len(data) != meta.get("size") or hashlib.sha256(data).hexdigest() != meta.get("sha256"):
            return None, "truncated or corrupt artifact (size or sha256 differs)"
        return meta, "ok"

    def valid(self, spec: KernelSpec) -> bool:
        return self.check(spec)[0] is not None

    def load(self, spec: KernelSpec) -> Optional[Callable]:
        """The stored function of `spec`, or None (missing, invalid or unloadable: compile it)."""
        meta, why = self.check(spec)
        if meta is None:
            level = logging.DEBUG if why == "no entry" else logging.WARNING
            log.log(level, "flashgdn disk cache: %s: %s; compiling it", spec.short_name(), why)
            return None
        try:
            return load_artifact(self.directory / meta["artifact"], meta["kind"], meta["symbol"])
        except Exception as exc:  # a library whose dependencies moved, a foreign file, ...
            log.warning("flashgdn disk cache: %s: loading %s failed (%s: %s); compiling it",
                        spec.short_name(), meta["artifact"], type(exc).__name__, exc)
            return None

    def store(self, spec: KernelSpec, fn, compile_s: Optional[float] = None) -> bool:
        """Export `fn`, the compiled function of `spec`, into the cache (overwriting the entry).
        Returns whether it was stored; a failure is logged, never raised: it only costs a later
        process a compile."""
        try:
            facts = entry_facts(spec)
            key = _key(facts)
            symbol = f"flashgdn_{key[:32]}"
            data, kind = export_artifact(fn, symbol)
            digest = hashlib.sha256(data).hexdigest()
            directory = self.directory
            directory.mkdir(parents=True, exist_ok=True)
            name = f"{key}-{digest[:16]}.{kind}"
            _write_atomic(directory / name, data)
            meta = {
                "key": key, "facts": facts, "name": spec.short_name(), "artifact": name,
                "kind": kind, "symbol": symbol, "size": len(data), "sha256": digest,
                "compile_s": None if compile_s is None else round(compile_s, 3),
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            _write_atomic(directory / f"{key}.json", (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())
            # An artifact of this key with other content (another linker, say) is no longer named
            # by the metadata. A process about to load it falls back to compiling.
            for other in directory.glob(f"{key}-*"):
                if other.name != name and _ARTIFACT_NAME.fullmatch(other.name):
                    other.unlink(missing_ok=True)
            return True
        except Exception as exc:
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "flashgdn disk cache: storing %s in %s failed (%s: %s)",
                    spec.short_name(), self.directory, type(exc).__name__, exc)
            return False
