"""Single-file archives of nodejob: the worker bundle, and the parts zipapp.py shares with it.

`worker_bundle_path(home)` returns a pure-Python zip application that runs ``nodejob worker``
under any Python 3.11+ with nothing installed. The out-of-process executions mount it into
containers or ship it to Ray, so a pip-installed nodejob needs no source checkout. It holds
nodejob/protocol.py, nodejob/worker.py and nodejob/workflow/ plus trio and its pure-Python
dependencies, read through importlib.resources: that works alike from a checkout, a pip install
and from inside nodejob.pyz (a zip).

The archives are deterministic (sorted entries, fixed timestamps) and carry legacy ``.pyc``
files next to the sources, as zipimport ignores ``__pycache__``. The pycs are unchecked-hash
ones, so zipimport never reads the source to validate them; an interpreter of another version
finds a foreign magic number and compiles the source instead.

This module imports only the standard library: the server's execution code imports it.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.resources
import importlib.util
import json
import marshal
import os
import sys
import tempfile
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import nodejob

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping
    from importlib.resources.abc import Traversable

ARCHIVE_DATE: Final = (2020, 1, 1, 0, 0, 0)
"""Every zip entry's timestamp: equal inputs give byte-identical archives."""
SHEBANG: Final = b"#!/usr/bin/env python3\n"
BUILD_INFO: Final = "nodejob-build.json"
"""At an archive's root: its build description (see entry_files)."""
BUNDLES_DIR: Final = "bundles"
"""Under NODEJOB_HOME: where `worker_bundle_path` caches worker bundles."""
WORKER_MODULES: Final = ("nodejob/__init__.py", "nodejob/protocol.py", "nodejob/worker.py")
WORKER_PACKAGES: Final = ("nodejob.workflow",)
WORKER_DEPENDENCIES: Final = (
    "trio",
    "sniffio",
    "attr",
    "attrs",
    "outcome",
    "sortedcontainers",
    "idna",
)
"""trio and what it imports on Python 3.11+ (exceptiongroup only before 3.11, cffi on Windows)."""
SKIPPED_DIRS: Final = frozenset({"__pycache__", "tests", "_tests"})
SKIPPED_SUFFIXES: Final = (".pyc", ".pyo", ".pyi")
BOOT_MODULE: Final = "nodejob/_pyz_boot.py"
"""Loaded by every archive's __main__.py straight from the zip (see nodejob/_pyz_boot.py)."""
FINGERPRINT_CHARS: Final = 12

MAIN_TEMPLATE: Final = """\
# The entry point of {name}, written by nodejob/bundle.py.
# Old syntax on purpose: any Python can parse this file, so a wrong interpreter gets a clear
# message instead of a SyntaxError or a traceback from deep inside an import.
import os
import sys
import zipimport

BUILD = {build!r}

if (sys.version_info[:2] != tuple(BUILD["python"]) if BUILD["exact_python"]
        else sys.version_info[:2] < tuple(BUILD["python"])):
    sys.stderr.write("%s: %s; this is Python %s (%s).\\n" % (
        os.path.basename(os.path.dirname(os.path.abspath(__file__))), BUILD["needs"],
        sys.version.split()[0], sys.executable))
    sys.exit(2)

# Load the boot module from this archive by path: an installed nodejob (an editable install's
# import hook, say) must not stand in for the archive's own.
ARCHIVE = os.path.dirname(os.path.abspath(__file__))
_boot = type(sys)("nodejob._pyz_boot")
_boot.__file__ = os.path.join(ARCHIVE, "nodejob", "_pyz_boot.py")
exec(zipimport.zipimporter(os.path.join(ARCHIVE, "nodejob", "")).get_code("_pyz_boot"),
     _boot.__dict__)
_boot.main(BUILD, ARCHIVE)
"""


class BundleError(RuntimeError):
    """An archive cannot be built; the message names the file and the reason."""


# -- collecting files ---------------------------------------------------------------------------


def tree_files(root: Traversable, prefix: str) -> dict[str, bytes]:
    """Every file under `root`, keyed ``prefix/relative/path``, minus caches, tests and stubs.

    `root` is an importlib.resources Traversable, so this reads a directory on disk and a
    folder inside a zip alike.
    """
    files: dict[str, bytes] = {}
    for entry in root.iterdir():
        name = f"{prefix}/{entry.name}"
        if entry.is_dir():
            if entry.name not in SKIPPED_DIRS:
                files.update(tree_files(entry, name))
        elif entry.is_file() and not entry.name.endswith(SKIPPED_SUFFIXES):
            files[name] = entry.read_bytes()
    return files


def package_files(package: str) -> dict[str, bytes]:
    """The files of an importable package, keyed by their path in an archive."""
    try:
        root = importlib.resources.files(package)
    except ModuleNotFoundError:
        raise BundleError(f"{package} is not installed: pip install {package}") from None
    files = tree_files(root, package.replace(".", "/"))
    if not any(name.endswith(".py") for name in files):
        raise BundleError(f"{package}: no Python sources found under {root}")
    return files


def worker_files() -> dict[str, bytes]:
    """Every file of the worker bundle except __main__.py: nodejob's part, then trio & deps.

    Raises BundleError when a bundled nodejob module imports, at module level, something the
    bundle does not hold: better to fail here than in a container.
    """
    files: dict[str, bytes] = {}
    nodejob_root = importlib.resources.files("nodejob")
    for name in (*WORKER_MODULES, BOOT_MODULE):
        entry = nodejob_root.joinpath(name.removeprefix("nodejob/"))
        if entry.is_file():
            files[name] = entry.read_bytes()
        elif name != "nodejob/worker.py":
            raise BundleError(f"{name} is missing from {nodejob_root}")
        # Without worker.py the bundle still builds; its __main__ then says what is missing.
    for package in WORKER_PACKAGES:
        files.update(package_files(package))
    check_imports(files, WORKER_DEPENDENCIES, _module_names(nodejob_root, "nodejob"))
    for package in WORKER_DEPENDENCIES:
        files.update(package_files(package))
    metadata = f"Metadata-Version: 2.1\nName: nodejob\nVersion: {nodejob.__version__}\n"
    files[f"nodejob-{nodejob.__version__}.dist-info/METADATA"] = metadata.encode()
    return files


def check_imports(
    files: Mapping[str, bytes], allowed_tops: Iterable[str], elsewhere: Iterable[str] = ()
) -> None:
    """Fail if a nodejob module in `files`, when loaded, imports what the archive will not hold.

    `allowed_tops` are the other top-level packages the archive carries (the stdlib is always
    allowed); `elsewhere` names nodejob modules that exist but stay out, so that
    ``from nodejob import store`` is caught although it could name an attribute. Only
    module-level imports count; those under ``if TYPE_CHECKING:``, inside a ``try`` that
    handles ImportError, or inside functions are skipped.
    """
    allowed = {*allowed_tops, *sys.stdlib_module_names, "__future__"}
    modules = {_module_name(name) for name in files if name.endswith(".py")}
    outside = set(elsewhere) - modules
    for name, source in sorted(files.items()):
        if not (name.startswith("nodejob/") and name.endswith(".py")):
            continue
        module = _module_name(name)
        base = module if name.endswith("/__init__.py") else module.rpartition(".")[0]
        for imported, surely_module in _loaded_imports(ast.parse(source, name), base):
            top = imported.partition(".")[0]
            if top != "nodejob":
                missing = top not in allowed
            elif surely_module:
                missing = imported not in modules
            else:  # `from package import name`: a module, or an attribute of the package
                missing = imported in outside
            if missing:
                raise BundleError(f"{name} imports {imported}, which the bundle does not hold")


def _module_name(arcname: str) -> str:
    return arcname.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def _module_names(root: Traversable, package: str) -> Iterable[str]:
    """The dotted names of every module under `root`, a package's resources."""
    for entry in root.iterdir():
        if entry.is_dir() and entry.name not in SKIPPED_DIRS:
            yield from _module_names(entry, f"{package}.{entry.name}")
        elif entry.name == "__init__.py":
            yield package
        elif entry.name.endswith(".py"):
            yield f"{package}.{entry.name.removesuffix('.py')}"


def _loaded_imports(tree: ast.Module, base: str) -> Iterable[tuple[str, bool]]:
    """(absolute name, whether it is surely a module) for what executing `tree` imports."""
    pending: list[ast.stmt] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            yield from ((alias.name, True) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:
                parts = base.split(".")
                anchor = ".".join(parts[: len(parts) - node.level + 1])
                module = f"{anchor}.{module}" if module else anchor
            yield module, True
            yield from ((f"{module}.{a.name}", False) for a in node.names if a.name != "*")
        elif isinstance(node, ast.If):
            if not _is_type_checking(node.test):
                pending.extend(node.body)
            pending.extend(node.orelse)
        elif isinstance(node, ast.Try):
            if not any(_catches_import_error(handler) for handler in node.handlers):
                pending.extend(node.body)
            pending.extend([*node.orelse, *node.finalbody])
            for handler in node.handlers:
                pending.extend(handler.body)
        elif isinstance(node, ast.With):
            pending.extend(node.body)


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(name, ast.Name) and name.id in ("ImportError", "ModuleNotFoundError")
        for name in names
    )


# -- writing archives ---------------------------------------------------------------------------


def pyc_bytes(source: bytes, filename: str) -> bytes | None:
    """An unchecked-hash pyc of `source` for this interpreter; None if it does not compile.

    `filename` is what tracebacks show; linecache still finds the source through the
    module's loader.
    """
    try:
        code = compile(source, filename, "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError):
        return None  # a file meant for another Python version: zipimport compiles or skips it
    flags = (0b01).to_bytes(4, "little")  # hash-based, check_source off
    return (
        importlib.util.MAGIC_NUMBER
        + flags
        + importlib.util.source_hash(source)
        + marshal.dumps(code)
    )


def with_bytecode(
    files: Mapping[str, bytes], label: str, pycache_prefixes: tuple[str, ...] = ()
) -> dict[str, bytes]:
    """`files` plus a pyc for every ``.py``, whose tracebacks read ``label/path``.

    The pyc sits next to its source (legacy layout, what zipimport reads), except under
    `pycache_prefixes`: those files get extracted to disk, where only ``__pycache__`` counts.
    """
    result = dict(files)
    tag = sys.implementation.cache_tag
    for name, source in files.items():
        if not name.endswith(".py"):
            continue
        pyc = pyc_bytes(source, f"{label}/{name}")
        if pyc is None:
            continue
        if name.startswith(pycache_prefixes):
            folder, _, stem = name.removesuffix(".py").rpartition("/")
            result[f"{folder}/__pycache__/{stem}.{tag}.pyc"] = pyc
        else:
            result[name + "c"] = pyc
    return result


def fingerprint(files: Mapping[str, bytes]) -> str:
    """A short hex digest of names and contents, for naming cached archives."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    return digest.hexdigest()[:FINGERPRINT_CHARS]


def entry_files(name: str, build: Mapping[str, Any]) -> dict[str, bytes]:
    """The __main__.py of an archive called `name`, and its build description as JSON.

    The JSON copy (``unzip -p nodejob.pyz nodejob-build.json``) states what the archive was
    built for without running it.
    """
    text = json.dumps(dict(build), indent=2, sort_keys=True) + "\n"
    return {"__main__.py": main_source(name, build), BUILD_INFO: text.encode()}


def main_source(name: str, build: Mapping[str, Any]) -> bytes:
    """The __main__.py of an archive called `name` with the build description `build`.

    `build` needs: python ([major, minor]), exact_python (bool), needs (the sentence a wrong
    interpreter is told), entry ("module:function"), archive_tops, native_tops, platform,
    native_id; nodejob/_pyz_boot.py documents each.
    """
    return MAIN_TEMPLATE.format(name=name, build=dict(build)).encode()


def write_archive(target: Path, files: Mapping[str, bytes], *, replace: bool = True) -> Path:
    """Write `files` as an executable zip application at `target`, atomically; returns `target`.

    The archive is written under a temporary name beside `target` and then renamed, so a
    reader sees either no file, the old one or the whole new one. With ``replace=False`` an
    existing `target` is left alone (another writer got there first). No zip comment: the
    zipimport of Python < 3.8 cannot find the directory of an archive that has one, and then
    a wrong interpreter would print a SyntaxError instead of __main__.py's message.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(SHEBANG)
            with zipfile.ZipFile(stream, "w", zipfile.ZIP_DEFLATED) as archive:
                for name in sorted({*files, *_folders(files)}):
                    info = zipfile.ZipInfo(name, ARCHIVE_DATE)
                    if name.endswith("/"):
                        info.external_attr = (0o40755 << 16) | 0x10  # directory, MS-DOS flag too
                        archive.writestr(info, b"")
                    else:
                        info.compress_type = zipfile.ZIP_DEFLATED
                        info.external_attr = 0o644 << 16
                        archive.writestr(info, files[name])
        os.chmod(temp, 0o755)
        if replace:
            os.replace(temp, target)
        else:
            _publish_once(temp, target)
    finally:
        Path(temp).unlink(missing_ok=True)
    return target


def _folders(files: Iterable[str]) -> set[str]:
    """Every folder above `files`, as ``a/`` and ``a/b/`` entries.

    zipimport finds a namespace package (a folder without __init__.py, such as flask.sansio)
    only through its folder's own entry.
    """
    folders: set[str] = set()
    for name in files:
        parts = name.split("/")[:-1]
        folders.update("/".join(parts[: end + 1]) + "/" for end in range(len(parts)))
    return folders


def _publish_once(temp: str, target: Path) -> None:
    """Give `temp` the name `target` unless that exists; never overwrite."""
    try:
        os.link(temp, target)  # atomic, and fails if target exists
    except FileExistsError:
        pass
    except OSError:
        # No hard links here (some network or FUSE file systems): a rename is still atomic,
        # and same-version bundles differ at most in bytes nobody is reading yet.
        if not target.exists():
            os.replace(temp, target)


# -- the worker bundle --------------------------------------------------------------------------


def worker_build(files: Mapping[str, bytes]) -> dict[str, Any]:
    """The build description of a worker bundle holding `files` (see main_source)."""
    tops = sorted({name.partition("/")[0] for name in files if "/" in name} - {"__pycache__"})
    return {
        "nodejob": nodejob.__version__,
        "python": [3, 11],
        "exact_python": False,
        "needs": "the nodejob worker bundle needs Python 3.11 or newer",
        "entry": "nodejob.worker:main",
        "argv_command": "worker",
        "archive_tops": [top for top in tops if top.isidentifier()],
        "native_tops": [],
        "platform": "any",
        "native_id": "",
        "fingerprint": fingerprint(files),
    }


def build_worker_bundle(target: Path, *, replace: bool = True) -> Path:
    """Build the worker bundle at `target`, atomically, from the running nodejob; returns it.

    Raises BundleError if a source is missing or a bundled module imports outside the bundle.
    """
    return _write_worker_bundle(target, worker_files(), replace=replace)


def _write_worker_bundle(target: Path, files: Mapping[str, bytes], *, replace: bool) -> Path:
    archive = {**files, **entry_files(target.name, worker_build(files))}
    return write_archive(target, with_bytecode(archive, target.name), replace=replace)


_lock = threading.Lock()
_cached: dict[Path, Path] = {}


def worker_bundle_path(home: str | os.PathLike[str]) -> Path:
    """A worker bundle for this nodejob, built into ``home/bundles`` on first use.

    The name is ``nodejob-worker-VERSION-FINGERPRINT.pyz``, the fingerprint covering every
    file inside, so a changed source (an editable install) makes a new file. An existing file
    is never rewritten: a running worker's zipimport reopens the archive by name for each
    import. Safe to call from several threads or processes at once; the answer is remembered
    for the life of the process. Blocking (reads ~150 files; ~0.3 s the first time, when it
    builds): call it through trio.to_thread.run_sync. Raises BundleError as
    build_worker_bundle does.
    """
    bundles = Path(home).expanduser().absolute() / BUNDLES_DIR
    with _lock:
        known = _cached.get(bundles)
        if known is not None and known.is_file():
            return known
        files = worker_files()
        target = bundles / f"nodejob-worker-{nodejob.__version__}-{fingerprint(files)}.pyz"
        if not target.is_file():
            _write_worker_bundle(target, files, replace=False)
        _cached[bundles] = target
        return target
