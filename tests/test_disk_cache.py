"""CPU tests of the on-disk compile cache (flashgdn.disk_cache) and of flashgdn-precompile.

One small variant, compiled for sm_90a without a GPU (about a second each time). The entries are
real: exported by CuTe DSL, linked, checksummed, loaded back with TVM-FFI in this process and in
child processes that share the cache directory.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from flashgdn import disk_cache, precompile
from flashgdn.cache import CompileCache, compile_variant
from flashgdn.disk_cache import DiskCache, entry_key
from flashgdn.spec import KernelArgs, KernelSpec

REPO = Path(__file__).resolve().parents[1]
SPEC = KernelSpec(layout="klast", H=1, HV=1, K=64, V=64, T=1, io_dtype="bfloat16", state_dtype="float32",
                  gate_dtype="bfloat16", dt_bias_dtype="float32", scale=0.125, use_l2norm=True, arch="sm_90a",
                  regime="small")

# A process of its own that gets SPEC from flashgdn's global cache and reports what it did.
CHILD = r"""
import json, sys
from flashgdn.cache import kernel_cache
from flashgdn.spec import KernelSpec
fn = kernel_cache.get(KernelSpec(**json.loads(sys.argv[1])))
try:
    fn()  # no arguments: the argument check fails before anything needs a GPU
    error = ""
except Exception as exc:
    error = str(exc)
print(json.dumps({"compiles": kernel_cache.compiles, "disk_loads": kernel_cache.disk_loads,
                  "cutlass_imported": "cutlass" in sys.modules, "call_error": error[:300]}))
"""


# On a GPU: one decode step through the public API, on a side stream, against the fp64 reference;
# saves the output and the new state to argv[1].
GPU_CHILD = r"""
import json, sys, torch, flashgdn
from flashgdn import reference as ref
from flashgdn.cache import kernel_cache
g = torch.Generator(device="cuda").manual_seed(0)
def randn(*shape, dtype=torch.bfloat16):
    return torch.randn(*shape, generator=g, device="cuda").to(dtype)
B, H, HV, K, V = 3, 1, 2, 64, 64
q, k, v, a, b = randn(B, 1, H, K), randn(B, 1, H, K), randn(B, 1, HV, V), randn(B, 1, HV), randn(B, 1, HV)
A_log, dt_bias = torch.log(torch.rand(HV, generator=g, device="cuda") * 15 + 1), randn(HV, dtype=torch.float32)
state = randn(B, HV, V, K, dtype=torch.float32)
ref_out, ref_state = ref.gated_delta_rule_decode_pretranspose(q, k, v, state.double(), A_log, a, dt_bias, b,
                                                              compute_dtype=torch.float64)
side = torch.cuda.Stream()
side.wait_stream(torch.cuda.current_stream())
with torch.cuda.stream(side):  # the kernel launches on the caller's current stream
    out, new_state = flashgdn.gated_delta_rule_decode_pretranspose(q, k, v, state, A_log, a, dt_bias, b)
side.synchronize()
torch.save({"out": out.cpu(), "state": new_state.cpu()}, sys.argv[1])
err = lambda x, r: ((x.double() - r).abs().max() / r.abs().max().clamp(min=1)).item()
print(json.dumps({"compiles": kernel_cache.compiles, "disk_loads": kernel_cache.disk_loads,
                  "out_err": err(out, ref_out.double()), "state_err": err(new_state, ref_state)}))
"""


def child(cache_dir: Path, script: str = CHILD, *args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "FLASHGDN_DISK_CACHE"}
    path = [str(REPO)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    env.update(FLASHGDN_CACHE_DIR=str(cache_dir), PYTHONPATH=os.pathsep.join(path))
    args = args or (json.dumps(dataclasses.asdict(SPEC)),)
    return subprocess.Popen([sys.executable, "-c", script, *args], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def fresh_cache(directory: Path) -> CompileCache:
    return CompileCache(compile_variant, disk=DiskCache(directory, enabled=True))


def metadata(directory: Path) -> dict:
    return json.loads((directory / f"{entry_key(SPEC)}.json").read_text())


@pytest.fixture(scope="module")
def seeded(tmp_path_factory) -> Path:
    """A cache directory holding SPEC's entry, compiled once for the module."""
    directory = tmp_path_factory.mktemp("seeded")
    cache = fresh_cache(directory)
    cache.get(SPEC)
    assert (cache.compiles, cache.disk_loads) == (1, 0) and DiskCache(directory).valid(SPEC)
    return directory


@pytest.fixture
def entry(seeded, tmp_path) -> Path:
    """A copy of the seeded directory, for a test to damage."""
    return Path(shutil.copytree(seeded, tmp_path / "cache"))


# ----------------------------------------------------------------------------- across processes


def test_second_process_loads_without_compiling(entry):
    r = result(child(entry))
    assert (r["compiles"], r["disk_loads"]) == (0, 1)
    # No GPU: the call stops at the argument check, which counts the kernel's tensors (KernelArgs).
    assert f"{len(KernelArgs._fields)} parameters" in r["call_error"]
    if metadata(entry)["kind"] == "so":  # a shared library loads without CuTe DSL
        assert not r["cutlass_imported"]


def test_racing_processes_both_succeed(tmp_path):
    procs = [child(tmp_path), child(tmp_path)]
    for r in map(result, procs):
        assert r["compiles"] + r["disk_loads"] == 1
    assert DiskCache(tmp_path).check(SPEC) == (metadata(tmp_path), "ok")
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    cache = fresh_cache(tmp_path)
    cache.get(SPEC)
    assert (cache.compiles, cache.disk_loads) == (0, 1)


@pytest.mark.gpu
def test_loaded_kernel_runs_like_the_compiled_one(tmp_path):
    """The process that compiles and the one that loads from disk compute the same bits."""
    import torch

    runs = []
    for name in ("compiled", "loaded"):
        r = result(child(tmp_path / "cache", GPU_CHILD, str(tmp_path / f"{name}.pt")))
        assert r["out_err"] < 2e-2 and r["state_err"] < 1e-2, r
        runs.append((r["compiles"], r["disk_loads"]))
    assert runs == [(1, 0), (0, 1)]
    compiled, loaded = (torch.load(tmp_path / f"{name}.pt") for name in ("compiled", "loaded"))
    assert torch.equal(compiled["out"], loaded["out"]) and torch.equal(compiled["state"], loaded["state"])


# ----------------------------------------------------------------------------- damaged entries


def _truncate(directory):
    path = directory / metadata(directory)["artifact"]
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _old_version(directory):
    meta = metadata(directory)
    meta["facts"]["environment"]["flashgdn"] = "0.0.1"
    (directory / f"{meta['key']}.json").write_text(json.dumps(meta))


def _garbage_metadata(directory):
    (directory / f"{entry_key(SPEC)}.json").write_text('{"key": "trunc')


def _unloadable_library(directory):
    """Intact checksum, but no library inside: the load itself fails."""
    meta = metadata(directory)
    data = b"not a shared library" * 10
    (directory / meta["artifact"]).write_bytes(data)
    meta.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (directory / f"{meta['key']}.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("damage", [_truncate, _old_version, _garbage_metadata, _unloadable_library])
def test_damaged_entry_is_rebuilt(entry, damage):
    damage(entry)
    orphan = entry / f"{entry_key(SPEC)}-{'0' * 16}.so"  # an artifact no metadata names
    orphan.write_bytes(b"old")
    if damage is not _unloadable_library:
        assert not DiskCache(entry).valid(SPEC)
    cache = fresh_cache(entry)
    cache.get(SPEC)
    assert (cache.compiles, cache.disk_loads) == (1, 0)
    assert DiskCache(entry).check(SPEC)[1] == "ok" and not orphan.exists()
    again = fresh_cache(entry)
    again.get(SPEC)
    assert (again.compiles, again.disk_loads) == (0, 1)


def test_disabled_reads_and_writes_nothing(entry, tmp_path, monkeypatch):
    before = {p.name: p.stat().st_mtime_ns for p in entry.iterdir()}
    monkeypatch.setenv("FLASHGDN_DISK_CACHE", "0")
    for directory in (entry, tmp_path / "empty"):
        monkeypatch.setenv("FLASHGDN_CACHE_DIR", str(directory))
        cache = CompileCache(compile_variant, disk=DiskCache())  # as flashgdn.cache.kernel_cache
        cache.get(SPEC)
        assert (cache.compiles, cache.disk_loads) == (1, 0)
    assert {p.name: p.stat().st_mtime_ns for p in entry.iterdir()} == before
    assert not (tmp_path / "empty").exists()


def test_object_file_without_a_c_compiler(tmp_path, monkeypatch):
    monkeypatch.setattr(disk_cache, "_c_compiler", lambda: None)
    fresh_cache(tmp_path).get(SPEC)
    assert metadata(tmp_path)["kind"] == "o" and metadata(tmp_path)["artifact"].endswith(".o")
    cache = fresh_cache(tmp_path)
    assert callable(cache.get(SPEC)) and (cache.compiles, cache.disk_loads) == (0, 1)


# ----------------------------------------------------------------------------- key and settings


def test_key_covers_spec_and_environment(monkeypatch):
    key = entry_key(SPEC)
    assert entry_key(dataclasses.replace(SPEC)) == key and len(key) == 64
    for change in (dict(regime="large"), dict(arch="sm_100a"), dict(scale=0.1250001), dict(tile=(4, 1, 16)),
                   dict(state_dtype="bfloat16")):
        assert entry_key(dataclasses.replace(SPEC, **change)) != key, change
    monkeypatch.setenv("CUTE_DSL_LOG_LEVEL", "10")  # logging only: the same entry
    monkeypatch.setenv("CUTE_DSL_ARCH", "sm_100a")  # the build passes --gpu-arch itself
    assert entry_key(SPEC) == key
    monkeypatch.setenv("CUTE_DSL_LINEINFO", "1")  # changes the generated code
    assert entry_key(SPEC) != key
    monkeypatch.delenv("CUTE_DSL_LINEINFO")
    facts = dict(disk_cache._static_environment())
    for name in ("flashgdn", "flashgdn_kernel_source", "nvidia-cutlass-dsl", "apache-tvm-ffi", "host"):
        assert facts[name], name
    monkeypatch.setattr(disk_cache, "_static_environment", lambda: (*facts.items(), ("nvidia-cutlass-dsl", "9")))
    assert entry_key(SPEC) != key


def test_directory_and_switch(monkeypatch, tmp_path):
    monkeypatch.delenv("FLASHGDN_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert DiskCache().directory == tmp_path / "xdg" / "flashgdn"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert DiskCache().directory == Path.home() / ".cache" / "flashgdn"
    monkeypatch.setenv("FLASHGDN_CACHE_DIR", str(tmp_path / "mine"))
    assert DiskCache().directory == tmp_path / "mine" and DiskCache().enabled
    assert DiskCache(tmp_path / "explicit").directory == tmp_path / "explicit"
    for off in ("0", "false", "OFF"):
        monkeypatch.setenv("FLASHGDN_DISK_CACHE", off)
        assert not DiskCache().enabled
    monkeypatch.setenv("FLASHGDN_DISK_CACHE", "1")
    assert DiskCache().enabled


# ----------------------------------------------------------------------------- flashgdn-precompile

SMALL_MODEL = ["-H", "1", "-HV", "1", "--head-k", "64", "--head-v", "64", "--no-pool"]


def test_precompile_enumerates_both_regimes(capsys):
    assert precompile.main(["--list", "--state-dtype", "fp32", "bf16", "--seq-len", "1", "4",
                            "--layout", "klast", "kmajor", "--arch", "sm_90a", "sm_100a"]) == 0
    names = capsys.readouterr().out.split()
    # per arch and state dtype: T=1 kmajor dense, klast pool (int32); T=4 klast pool; x 2 regimes
    assert len(names) == len(set(names)) == 2 * 2 * 3 * 2
    assert sum("/small/" in n for n in names) == sum("/large/" in n for n in names) == 12
    specs = precompile.model_specs(precompile.parse_args(SMALL_MODEL))
    assert [s.regime for s in specs] == ["small", "large"]
    # The API's spec for the small model, as the tests above use it (plus the device's table).
    expected = dataclasses.replace(SPEC, device_class=specs[0].device_class)
    assert {dataclasses.replace(s, regime="small") for s in specs} == {expected}


def test_precompile_then_load(tmp_path, capsys):
    args = SMALL_MODEL + ["--cache-dir", str(tmp_path)]
    assert precompile.main(args) == 0
    out = capsys.readouterr().out
    assert out.count(": compiled (") == 2 and "2 compiled, 0 loaded from disk, 0 failed" in out
    assert precompile.main(args) == 0
    assert "0 compiled, 2 loaded from disk, 0 failed" in capsys.readouterr().out


def test_precompile_failures(tmp_path, monkeypatch, capsys):
    def broken(spec):
        raise RuntimeError("no such kernel\nsecond line")

    monkeypatch.setitem(precompile._CACHES, str(tmp_path), CompileCache(broken, disk=DiskCache(tmp_path, enabled=True)))
    assert precompile.main(SMALL_MODEL + ["--cache-dir", str(tmp_path), "--regime", "small"]) == 1
    assert "FAILED: RuntimeError: no such kernel (" in capsys.readouterr().out
    monkeypatch.setenv("FLASHGDN_DISK_CACHE", "0")
    assert precompile.main(SMALL_MODEL + ["--cache-dir", str(tmp_path)]) == 2
    with pytest.raises(SystemExit) as e:
        precompile.main(["-H", "3", "-HV", "4"])
    assert e.value.code == 2
