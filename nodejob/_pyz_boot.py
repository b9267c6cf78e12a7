"""Start-up of nodejob.pyz and nodejob-worker.pyz (built by zipapp.py and nodejob/bundle.py).

An archive's generated __main__.py checks the Python version in syntax any interpreter parses,
then loads this module straight from the archive and calls `main`. Here we refuse a mismatched
interpreter with one clear line, extract the native extension modules (which zipimport cannot
load) to a per-version, per-platform cache directory the first time, put the archive's own
packages ahead of anything installed on the host, and call the entry point.

The build description (`BUILD` in __main__.py) holds: ``nodejob`` (version), ``python``
([major, minor]) and ``exact_python``, ``needs`` (what a wrong interpreter is told),
``entry`` ("module:function", called with the arguments), ``argv_command`` (a leading argument
to drop: the worker bundle accepts ``worker ARGS`` as well as ``ARGS``), ``archive_tops`` and
``native_tops`` (top-level import names in the archive and under ``.native/`` in it),
``platform`` (``cpython-3.11-linux-x86_64``), ``glibc`` (minimum version or null) and
``native_id`` (the cache directory's name).

Stdlib only, and only cheap imports on the warm path: this runs before every command.
"""

from __future__ import annotations

import importlib
import importlib.machinery
import os
import sys
from typing import TYPE_CHECKING, Any, Final, NoReturn

if TYPE_CHECKING:
    from collections.abc import Mapping, Sequence
    from importlib.machinery import ModuleSpec
    from types import ModuleType

EXIT_MISMATCH: Final = 2
NATIVE_PREFIX: Final = ".native/"
"""Where native packages live inside the archive: not importable from there, by design."""
MARKER: Final = ".nodejob-native"
"""Written last into an extracted directory, before the rename that publishes it."""
INFO_FLAG: Final = "--pyz-info"


def main(build: Mapping[str, Any], archive: str) -> NoReturn:
    """Run the archive: check, extract, isolate, then call the entry point and exit with it."""
    problem = interpreter_problem(build)
    if problem:
        _fail(problem)
    native = None
    if build["native_tops"]:
        try:
            native = native_dir(archive, build)
        except OSError as exc:
            _fail(
                f"cannot extract the native modules to {cache_root()}: {exc}; "
                "point XDG_CACHE_HOME at a writable directory"
            )
        sys.path.insert(1, native)
    sys.meta_path.insert(0, ArchiveFinder(archive, native, build))
    argv = sys.argv[1:]
    if argv[:1] == [INFO_FLAG]:
        _print_info(build, archive, native)
        raise SystemExit(0)
    if build.get("argv_command") and argv[:1] == [build["argv_command"]]:
        del argv[0]
    module, _, function = str(build["entry"]).partition(":")
    try:
        entry = getattr(importlib.import_module(module), function)
    except ImportError as exc:
        _fail(f"this archive cannot load {build['entry']}: {exc}")
    raise SystemExit(entry(argv))


def _fail(message: str) -> NoReturn:
    name = os.path.basename(sys.argv[0]) or "nodejob.pyz"
    sys.stderr.write(f"{name}: {message}\n")
    raise SystemExit(EXIT_MISMATCH)


# -- the interpreter ----------------------------------------------------------------------------


def platform_tag() -> str:
    """This interpreter's ``implementation-X.Y-os-machine``, e.g. ``cpython-3.11-linux-x86_64``."""
    version = "{}.{}".format(*sys.version_info[:2])
    machine = os.uname().machine if hasattr(os, "uname") else _windows_machine()
    return f"{sys.implementation.name}-{version}-{sys.platform}-{machine.lower()}"


def _windows_machine() -> str:
    import platform  # not cheap, and not needed where os.uname exists

    return platform.machine()


def glibc_version() -> tuple[int, ...] | None:
    """The C library's version if it is glibc, else None (musl, macOS, Windows)."""
    try:
        text = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36"
    except (AttributeError, ValueError, OSError):
        return None
    if not text or not text.startswith("glibc "):
        return None
    try:
        return tuple(int(part) for part in text.split()[1].split(".")[:2])
    except ValueError:
        return None


def interpreter_problem(build: Mapping[str, Any]) -> str | None:
    """Why this interpreter cannot run the archive, in one sentence; None if it can."""
    if not build["native_tops"]:
        return None  # pure Python: __main__.py has checked the version already
    here = platform_tag()
    if here != build["platform"]:
        return f"{build['needs']}; this is {here} ({sys.executable})"
    needed = build.get("glibc")
    if needed:
        have = glibc_version()
        if have is None or have < tuple(int(part) for part in str(needed).split(".")):
            libc = "glibc {}.{}".format(*have) if have else "no glibc"
            return f"{build['needs']}; this machine has {libc}"
    return None


# -- native modules -----------------------------------------------------------------------------


def cache_root() -> str:
    """``$XDG_CACHE_HOME/nodejob/pyz``, ``~/.cache/nodejob/pyz`` by default."""
    base = os.environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):  # the XDG spec says to ignore a relative path
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "nodejob", "pyz")


def native_dir(archive: str, build: Mapping[str, Any]) -> str:
    """The directory holding the archive's native packages, extracting them the first time.

    Its name carries the nodejob version, the platform and a hash of the native files, so
    archives that differ never share one. Extraction goes to a temporary directory beside it,
    renamed into place once complete: processes starting at once may all extract, one rename
    wins, the others see a complete directory and drop their copy. Raises OSError when the
    cache is not writable.
    """
    target = os.path.join(cache_root(), str(build["native_id"]))
    if not os.path.isfile(os.path.join(target, MARKER)):
        extract_native(archive, target, str(build["native_id"]))
    return target


def extract_native(archive: str, target: str, native_id: str) -> None:
    """Extract ``.native/`` of `archive` to `target` atomically (see native_dir)."""
    import shutil  # these three: first run only
    import tempfile
    import zipfile

    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    temp = tempfile.mkdtemp(prefix=".extract-", dir=parent)
    try:
        with zipfile.ZipFile(archive) as source:
            for info in source.infolist():
                if not info.filename.startswith(NATIVE_PREFIX) or info.is_dir():
                    continue
                relative = info.filename[len(NATIVE_PREFIX) :].split("/")
                if ".." in relative:
                    raise OSError(f"refusing to extract {info.filename!r}")
                path = os.path.join(temp, *relative)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                with source.open(info) as reader, open(path, "wb") as writer:
                    shutil.copyfileobj(reader, writer)
        with open(os.path.join(temp, MARKER), "w", encoding="utf-8") as marker:
            marker.write(native_id + "\n")
        _publish(temp, target)
    finally:
        shutil.rmtree(temp, ignore_errors=True)  # gone already unless we lost the race


def _publish(temp: str, target: str) -> None:
    """Rename the complete directory `temp` to `target`, tolerating a lost race."""
    try:
        os.rename(temp, target)
        return
    except OSError:
        if os.path.isfile(os.path.join(target, MARKER)):
            return  # another process published first; theirs is as good as ours
    # `target` exists without a marker: damaged by hand. Move it aside once, then retry.
    stale = f"{temp}.stale"
    import contextlib
    import shutil

    with contextlib.suppress(OSError):  # someone else moved it
        os.rename(target, stale)
    try:
        os.rename(temp, target)
    except OSError:
        if not os.path.isfile(os.path.join(target, MARKER)):
            raise
    finally:
        shutil.rmtree(stale, ignore_errors=True)


# -- import isolation ---------------------------------------------------------------------------


class ArchiveFinder:
    """Finds the archive's own top-level packages in the archive (or the native directory).

    It goes first on sys.meta_path, so nothing installed on the host (an editable install's
    import hook, an older trio in site-packages) can stand in for what the archive carries.
    Names the archive does not hold fall through to the normal finders, so plug-ins installed
    on the host still load.
    """

    def __init__(self, archive: str, native: str | None, build: Mapping[str, Any]) -> None:
        self._locations = dict.fromkeys(build["archive_tops"], archive)
        if native is not None:
            self._locations.update(dict.fromkeys(build["native_tops"], native))

    def find_spec(
        self, fullname: str, path: Sequence[str] | None = None, target: ModuleType | None = None
    ) -> ModuleSpec | None:
        location = self._locations.get(fullname.partition(".")[0])
        if location is None:
            return None
        search = [location] if path is None else path
        return importlib.machinery.PathFinder.find_spec(fullname, search, target)

    def invalidate_caches(self) -> None:
        """Nothing cached here (PathFinder keeps its own)."""


def _print_info(build: Mapping[str, Any], archive: str, native: str | None) -> None:
    """``--pyz-info``: what the archive is, where it extracted, and whether natives import."""
    import json

    imports: dict[str, str] = {}
    for name in build["native_tops"]:
        if name.isidentifier() and "__mypyc" not in name:
            try:
                module = importlib.import_module(name)
            except Exception as exc:  # a report, not a crash
                imports[name] = f"error: {exc!r}"
            else:
                imports[name] = str(getattr(module, "__file__", None) or "ok")
    info = {
        "build": dict(build),
        "archive": archive,
        "interpreter": {"platform": platform_tag(), "executable": sys.executable},
        "native_dir": native,
        "native_imports": imports,
    }
    sys.stdout.write(json.dumps(info, indent=2) + "\n")
