"""CPU test: the public signatures match FlashInfer's `flashinfer/gdn_decode.py` (pinned version).

For each public function the FlashInfer `def` is read out of the flashinfer-python wheel and parsed
with `ast` (FlashInfer is never imported: no GPU, no JIT, no CUDA libraries needed) and compared
with `inspect.signature` of flashgdn's function: parameter names, order, kind (positional-or-keyword
/ keyword-only ...) and defaults. flashgdn may add parameters only after all of FlashInfer's, only
keyword-only, only with a default, and only those named in FLASHGDN_EXTRAS, so that every call
written for FlashInfer binds the same way here.

The wheel (62 MB) is fetched with `pip download` at most once per session, into pytest's cache
directory where later runs find it (`--cache-clear` drops it), or into a temporary directory when
the cache plugin is off. FLASHGDN_FLASHINFER_WHEEL=path/to/the.whl uses an already downloaded wheel
instead. When pip cannot get the wheel (no network, no index) the comparison tests skip with pip's
error.
"""
from __future__ import annotations

import ast
import inspect
import os
import re
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path, PurePosixPath

import pytest

FLASHINFER_VERSION = "0.7.2.post1"
FLASHINFER_REQUIREMENT = f"flashinfer-python=={FLASHINFER_VERSION}"
WHEEL_GLOB = f"flashinfer_python-{FLASHINFER_VERSION}-*.whl"
MODULE = "flashinfer/gdn_decode.py"
FUNCTIONS = ("gated_delta_rule_decode_pretranspose", "gated_delta_rule_decode", "gated_delta_rule_mtp",
             "gated_delta_rule_replayssm_commit")
# Functions read from the package's exports instead (the def lives where the re-exports lead:
# flashinfer/gdn_kernels/experimental/gdn_fused_decode.py).
PACKAGE = "flashinfer/__init__.py"
PACKAGE_FUNCTIONS = ("gdn_fused_decode_step",)
# flashgdn's parameters beyond FlashInfer's (keyword-only, after all of FlashInfer's, with defaults).
FLASHGDN_EXTRAS = frozenset({"accepted_tokens", "softplus_beta", "softplus_threshold"})
# Decorators of the FlashInfer defs known to keep the signature (flashinfer_api returns the function
# itself or a functools.wraps wrapper). Any other decorator fails the test: it may change the
# signature, and the parse below would not see that.
SIGNATURE_KEEPING_DECORATORS = frozenset({"flashinfer_api"})
PIP_TIMEOUT_S = 120
ENV_WHEEL = "FLASHGDN_FLASHINFER_WHEEL"

P = inspect.Parameter
KIND_NAMES = {
    P.POSITIONAL_ONLY: "positional-only",
    P.POSITIONAL_OR_KEYWORD: "positional-or-keyword",
    P.VAR_POSITIONAL: "*args",
    P.KEYWORD_ONLY: "keyword-only",
    P.VAR_KEYWORD: "**kwargs",
}
NO_DEFAULT = "<no default>"


# ----------------------------------------------------------------------------- the wheel


def _pip_error(proc: subprocess.CompletedProcess) -> str:
    """The first line of pip's error ("ERROR: ..." if there is one)."""
    lines = [line.strip() for line in (proc.stderr or "").splitlines() if line.strip()]
    lines = lines or [line.strip() for line in (proc.stdout or "").splitlines() if line.strip()]
    for line in lines:
        if line.startswith("ERROR:"):
            return line
    return lines[0] if lines else f"pip exited with status {proc.returncode}"


def _wheel_version(wheel: Path) -> str | None:
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if re.fullmatch(r"[^/]+\.dist-info/METADATA", name):
                match = re.search(r"^Version: *(\S+)", zf.read(name).decode("utf-8", "replace"), re.M)
                return match.group(1) if match else None
    return None


def _download_wheel(dest: Path, scratch: Path) -> Path:
    """pip download into `scratch`, then move the wheel into `dest` (a partly written or concurrent
    download never leaves a broken file under `dest`). Skips the test on failure."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           FLASHINFER_REQUIREMENT, "-d", str(scratch)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pytest.skip(f"cannot download {FLASHINFER_REQUIREMENT}: pip download timed out after {PIP_TIMEOUT_S} s")
    except OSError as e:
        pytest.skip(f"cannot download {FLASHINFER_REQUIREMENT}: {e}")
    wheels = sorted(scratch.glob(WHEEL_GLOB))
    if proc.returncode != 0 or not wheels:
        pytest.skip(f"cannot download {FLASHINFER_REQUIREMENT}: {_pip_error(proc)}")
    dest.mkdir(parents=True, exist_ok=True)
    target = dest / wheels[0].name
    shutil.move(str(wheels[0]), str(target))
    return target


@pytest.fixture(scope="session")
def flashinfer_wheel(request, tmp_path_factory) -> Path:
    """The flashinfer-python wheel of FLASHINFER_VERSION: $FLASHGDN_FLASHINFER_WHEEL, a wheel
    downloaded by an earlier run (pytest's cache), or a fresh download."""
    given = os.environ.get(ENV_WHEEL)
    if given:
        wheel = Path(given).expanduser()
        if not wheel.is_file():
            pytest.fail(f"{ENV_WHEEL}={given}: no such file")
        if not zipfile.is_zipfile(wheel):
            pytest.fail(f"{ENV_WHEEL}={given}: not a wheel (zip) file")
    else:
        cache = getattr(request.config, "cache", None)  # None with -p no:cacheprovider
        dest = Path(cache.mkdir("flashinfer-wheel")) if cache is not None else tmp_path_factory.mktemp("flashinfer-wheel")
        cached = [w for w in sorted(dest.glob(WHEEL_GLOB)) if zipfile.is_zipfile(w)]
        wheel = cached[0] if cached else _download_wheel(dest, tmp_path_factory.mktemp("pip-download"))
    version = _wheel_version(wheel)
    if version != FLASHINFER_VERSION:
        pytest.fail(f"{wheel} is flashinfer-python {version}, the parity test pins {FLASHINFER_VERSION}")
    return wheel


# ----------------------------------------------------------------------------- FlashInfer's defs


class WheelSource:
    """Python modules of the wheel, parsed on demand."""

    def __init__(self, wheel: Path):
        self.wheel = wheel
        self._trees: dict[str, ast.Module] = {}
        with zipfile.ZipFile(wheel) as zf:
            self._names = set(zf.namelist())

    def tree(self, path: str) -> ast.Module:
        if path not in self._trees:
            if path not in self._names:
                raise LookupError(f"{self.wheel.name} has no {path}")
            with zipfile.ZipFile(self.wheel) as zf:
                text = zf.read(path).decode("utf-8")
            self._trees[path] = ast.parse(text, filename=path)
        return self._trees[path]

    def module_path(self, importer: str, node: ast.ImportFrom) -> str:
        """The wheel path of the module that `from ... import` in `importer` names."""
        package = PurePosixPath(importer).parent.parts  # e.g. ("flashinfer",)
        if node.level:
            package = package[: len(package) - (node.level - 1)]
        else:
            package = ()
        parts = [*package, *(node.module.split(".") if node.module else [])]
        base = "/".join(parts)
        for candidate in (f"{base}.py", f"{base}/__init__.py"):
            if candidate in self._names:
                return candidate
        raise LookupError(f"{importer}: cannot find the module of `{ast.unparse(node)}` in the wheel")


def _module_bindings(tree: ast.Module, name: str) -> list[ast.AST]:
    """Module-level statements that bind `name`, in execution order (top-level `if` / `try` /
    `with` blocks included; `except` handlers skipped: they run only when an import fails, and the
    export that matters is the one of a working install)."""
    found: list[ast.AST] = []

    def walk(stmts):
        for st in stmts:
            if isinstance(st, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and st.name == name:
                found.append(st)
            elif isinstance(st, (ast.Import, ast.ImportFrom)):
                for alias in st.names:
                    if (alias.asname or alias.name.split(".")[0]) == name:
                        found.append(st)
            elif isinstance(st, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = st.targets if isinstance(st, ast.Assign) else [st.target]
                if any(isinstance(n, ast.Name) and n.id == name for t in targets for n in ast.walk(t)):
                    found.append(st)
            elif isinstance(st, ast.If):
                walk(st.body)
                walk(st.orelse)
            elif isinstance(st, ast.Try) or type(st).__name__ == "TryStar":
                walk(st.body)
                walk(st.orelse)
                walk(st.finalbody)
            elif isinstance(st, (ast.With, ast.AsyncWith)):
                walk(st.body)

    walk(tree.body)
    return found


def find_exported_def(src: WheelSource, path: str, name: str, _seen=()) -> tuple[str, ast.FunctionDef]:
    """(module path, def) of the function that module `path` exports as `name`: its last module-level
    binding, followed through re-exports (`from .x import f as name`) and aliases (`name = f`)."""
    if (path, name) in _seen:
        raise LookupError(f"import cycle resolving {name}: {_seen}")
    seen = (*_seen, (path, name))
    bindings = _module_bindings(src.tree(path), name)
    if not bindings:
        raise LookupError(f"{path} does not define or import {name}")
    last = bindings[-1]
    if isinstance(last, (ast.FunctionDef, ast.AsyncFunctionDef)):
        return path, last
    if isinstance(last, ast.ImportFrom):
        alias = next(a for a in last.names if (a.asname or a.name) == name)
        return find_exported_def(src, src.module_path(path, last), alias.name, seen)
    if isinstance(last, ast.Assign) and isinstance(last.value, ast.Name):
        return find_exported_def(src, path, last.value.id, seen)
    raise LookupError(
        f"{path}:{last.lineno}: {name} is bound by `{ast.unparse(last)[:120]}`, not by a def this test can read"
    )


def _decorator_name(node: ast.expr) -> str:
    node = node.func if isinstance(node, ast.Call) else node
    return ast.unparse(node)


def _default_value(node: ast.expr | None):
    """("value", v) for a literal default, ("source", text) otherwise, NO_DEFAULT for none."""
    if node is None:
        return NO_DEFAULT
    try:
        return ("value", ast.literal_eval(node))
    except ValueError:
        return ("source", ast.unparse(node))


def params_of_def(fn: ast.FunctionDef) -> list[tuple[str, object, object]]:
    """[(name, kind, default)] of a parsed def, kind an inspect.Parameter kind."""
    a = fn.args
    positional = [*a.posonlyargs, *a.args]
    pos_defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    out = []
    for i, (arg, default) in enumerate(zip(positional, pos_defaults)):
        kind = P.POSITIONAL_ONLY if i < len(a.posonlyargs) else P.POSITIONAL_OR_KEYWORD
        out.append((arg.arg, kind, _default_value(default)))
    if a.vararg:
        out.append((a.vararg.arg, P.VAR_POSITIONAL, NO_DEFAULT))
    for arg, default in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, P.KEYWORD_ONLY, _default_value(default)))
    if a.kwarg:
        out.append((a.kwarg.arg, P.VAR_KEYWORD, NO_DEFAULT))
    return out


# ----------------------------------------------------------------------------- flashgdn's signatures


def _flashgdn_default_sources(fn) -> dict[str, str]:
    """Source text of flashgdn's default expressions, for FlashInfer defaults that are not literals."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(inspect.unwrap(fn))))
    except (OSError, TypeError, SyntaxError):
        return {}
    node = next((n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    if node is None:
        return {}
    return {name: default[1] for name, _, default in params_of_def(node) if default != NO_DEFAULT}


def _show_default(default) -> str:
    if default == NO_DEFAULT:
        return NO_DEFAULT
    return f"default={default[1]!r}" if default[0] == "value" else f"default=`{default[1]}`"


def _show(name, kind, default) -> str:
    return f"{name!r} ({KIND_NAMES[kind]}, {_show_default(default)})"


def _same_default(theirs, ours_value, ours_source: str | None) -> bool:
    if theirs == NO_DEFAULT or ours_value is P.empty:
        return theirs == NO_DEFAULT and ours_value is P.empty
    how, value = theirs
    if how == "value":  # same type too: True is not 1, 1 is not 1.0
        return type(ours_value) is type(value) and ours_value == value
    return ours_source == value


def signature_differences(fi_params, ours: inspect.Signature, ours_sources: dict[str, str]) -> list[str]:
    """Every difference between FlashInfer's parameters and flashgdn's, one readable line each."""
    problems = []
    fi_names = [name for name, _, _ in fi_params]
    our_params = list(ours.parameters.values())
    our_names = [p.name for p in our_params]
    by_name = {p.name: p for p in our_params}

    for name, kind, default in fi_params:
        p = by_name.get(name)
        if p is None:
            problems.append(f"missing parameter {_show(name, kind, default)}")
            continue
        if p.kind != kind:
            problems.append(f"parameter {name!r}: FlashInfer has it {KIND_NAMES[kind]}, flashgdn {KIND_NAMES[p.kind]}")
        if not _same_default(default, p.default, ours_sources.get(name)):
            theirs = _show_default(default)
            mine = NO_DEFAULT if p.default is P.empty else f"default={p.default!r}"
            problems.append(f"parameter {name!r}: FlashInfer {theirs}, flashgdn {mine}")

    common_fi = [n for n in fi_names if n in by_name]
    common_ours = [n for n in our_names if n in set(fi_names)]
    if common_fi != common_ours:
        at = next(i for i, (x, y) in enumerate(zip(common_fi, common_ours)) if x != y)
        problems.append(
            f"parameter order differs from position {at} of the shared parameters: FlashInfer "
            f"({', '.join(common_fi[at:])}), flashgdn ({', '.join(common_ours[at:])})"
        )
    positions = [i for i, n in enumerate(our_names) if n in set(fi_names)]
    last_fi = max(positions, default=-1)
    for i, p in enumerate(our_params):
        if p.name in fi_names:
            continue
        where = f"extra parameter {p.name!r} ({KIND_NAMES[p.kind]})"
        if p.name not in FLASHGDN_EXTRAS:
            problems.append(f"{where} is not in FlashInfer nor one of FLASHGDN_EXTRAS {sorted(FLASHGDN_EXTRAS)}")
        if p.kind != P.KEYWORD_ONLY:
            problems.append(f"{where} must be keyword-only")
        if i < last_fi:
            problems.append(f"{where} comes before FlashInfer's parameter {our_names[last_fi]!r}")
        if p.default is P.empty:
            problems.append(f"{where} has no default: a call written for FlashInfer would fail")
    return problems


# ----------------------------------------------------------------------------- the tests


@pytest.fixture(scope="session")
def wheel_source(flashinfer_wheel) -> WheelSource:
    return WheelSource(flashinfer_wheel)


@pytest.mark.parametrize("module,name", [(MODULE, n) for n in FUNCTIONS] + [(PACKAGE, n) for n in PACKAGE_FUNCTIONS])
def test_signature_matches_flashinfer(module, name, wheel_source):
    import flashgdn

    try:
        path, fn_def = find_exported_def(wheel_source, module, name)
    except LookupError as e:
        pytest.fail(f"cannot find FlashInfer's {name}: {e}")
    unknown = [_decorator_name(d) for d in fn_def.decorator_list
               if _decorator_name(d) not in SIGNATURE_KEEPING_DECORATORS]
    if unknown:
        pytest.fail(
            f"{path}:{fn_def.lineno} {name} has decorators {unknown} that this test does not know to keep "
            f"the signature; check them and extend SIGNATURE_KEEPING_DECORATORS",
            pytrace=False,
        )
    ours = getattr(flashgdn, name)
    problems = signature_differences(params_of_def(fn_def), inspect.signature(ours), _flashgdn_default_sources(ours))
    if problems:
        pytest.fail(
            f"flashgdn.{name} differs from flashinfer-python {FLASHINFER_VERSION} {path}:{fn_def.lineno}:\n  "
            + "\n  ".join(problems),
            pytrace=False,
        )


def test_exported_def_resolution(tmp_path):
    """The def lookup follows what the module really exports (a synthetic wheel, no network)."""
    wheel = tmp_path / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr("flashinfer/gdn_kernels/__init__.py", "")
        zf.writestr("flashinfer/gdn_kernels/impl.py", "def real(x, y=2.5, *, z='a'):\n    pass\n")
        zf.writestr(MODULE, textwrap.dedent("""
            def twice(a, b=1):
                pass
            @flashinfer_api(trace=None)
            def twice(a, b=(1, 2), *args, c=None, **kw):
                pass
            try:
                from .gdn_kernels.impl import real as reexported
            except ImportError:
                reexported = None
            def _impl(p, /, q=-1):
                pass
            aliased = _impl
            def odd():
                pass
            odd = wrap(odd)
        """))
    src = WheelSource(wheel)
    pk, pok, kw, va, vk = P.POSITIONAL_ONLY, P.POSITIONAL_OR_KEYWORD, P.KEYWORD_ONLY, P.VAR_POSITIONAL, P.VAR_KEYWORD

    path, fn = find_exported_def(src, MODULE, "twice")
    assert (path, [_decorator_name(d) for d in fn.decorator_list]) == (MODULE, ["flashinfer_api"])
    assert params_of_def(fn) == [("a", pok, NO_DEFAULT), ("b", pok, ("value", (1, 2))), ("args", va, NO_DEFAULT),
                                 ("c", kw, ("value", None)), ("kw", vk, NO_DEFAULT)]
    path, fn = find_exported_def(src, MODULE, "reexported")
    assert path == "flashinfer/gdn_kernels/impl.py"
    assert params_of_def(fn) == [("x", pok, NO_DEFAULT), ("y", pok, ("value", 2.5)), ("z", kw, ("value", "a"))]
    path, fn = find_exported_def(src, MODULE, "aliased")
    assert params_of_def(fn) == [("p", pk, NO_DEFAULT), ("q", pok, ("value", -1))]
    with pytest.raises(LookupError, match="not by a def"):
        find_exported_def(src, MODULE, "odd")
    with pytest.raises(LookupError, match="does not define"):
        find_exported_def(src, MODULE, "absent")
