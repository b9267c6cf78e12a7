# ruff: noqa: A005 - the file name is the interface: `python zipapp.py`
"""Build nodejob as one file: ``python zipapp.py`` writes dist/nodejob.pyz.

``python zipapp.py`` pip-installs this checkout and its dependencies into a staging folder and
zips it into dist/nodejob.pyz: runs with ``python3 nodejob.pyz COMMAND`` on a machine with the
same Python minor version, OS and architecture, and nothing installed.
``python zipapp.py --worker`` writes dist/nodejob-worker.pyz, pure Python, for any Python 3.11+
(the same builder `nodejob.bundle.worker_bundle_path` uses at run time).

Why not the stdlib's ``zipapp`` module or shiv: see docs/howto-zipapp.md. In short, the archive
needs legacy pycs, a ``.native/`` section extracted on demand, and a generated __main__ that
checks the interpreter; zipfile does all of that in a few lines, with no build dependency.
This file's name shadows the stdlib's ``zipapp`` for scripts run from the checkout; it never
imports it.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.machinery
import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from nodejob import __version__
from nodejob._pyz_boot import NATIVE_PREFIX, glibc_version, platform_tag
from nodejob.bundle import (
    SKIPPED_DIRS,
    build_worker_bundle,
    entry_files,
    with_bytecode,
    write_archive,
)

ROOT: Final = Path(__file__).resolve().parent
APP_NAME: Final = "nodejob.pyz"
WORKER_NAME: Final = "nodejob-worker.pyz"
COPY_IGNORE: Final = (
    ".git",
    ".ci",
    "build",
    "dist",
    "docs",
    "examples",
    "tests",
    "*.egg-info",
    "__pycache__",
    ".venv",
    ".*_cache",
)
"""Not copied from the checkout before pip builds it (pip would write build/ into the tree)."""
DROPPED: Final = (
    re.compile(r"^bin/"),  # console scripts: they hard-code the staging interpreter
    re.compile(r"^[^/]+\.pth$"),  # only site.py reads .pth files, never from a zip
    re.compile(r"^apsw/sqlite_extra_binaries/"),  # loadable SQLite extensions nodejob never loads
    re.compile(r"(^|/)[^/]+\.py[cio]$"),
)
NATIVE_SUFFIXES: Final = (*importlib.machinery.EXTENSION_SUFFIXES, ".so", ".pyd", ".dylib")
MANYLINUX_LEGACY: Final = {"manylinux1": (2, 5), "manylinux2010": (2, 12), "manylinux2014": (2, 17)}


def stage(site: Path, work: Path, pip_args: list[str], *, pin: bool) -> None:
    """pip-install a copy of this checkout and its dependencies into `site`.

    With `pin`, every dependency gets the version installed in this environment (the one the
    tests ran against), through a pip constraints file.
    """
    source = work / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(*COPY_IGNORE))
    if pin:
        constraints = work / "constraints.txt"
        constraints.write_text("".join(f"{pin}\n" for pin in installed_versions()))
        pip_args = ["--constraint", str(constraints), *pip_args]
    command = [
        sys.executable,
        "-m",
        "pip",
        "install",
        "--target",
        str(site),
        "--no-compile",
        "--no-warn-conflicts",
        "--no-warn-script-location",
        "--disable-pip-version-check",
        "--quiet",
        *pip_args,
        str(source),
    ]
    env = {**os.environ, "PIP_ROOT_USER_ACTION": "ignore"}
    subprocess.run(command, check=True, cwd=work, env=env)  # cwd: not this checkout (see top)


def installed_versions() -> list[str]:
    """``name==version`` for every distribution importable here except nodejob itself.

    Where sys.path holds two versions of one distribution, the first (the one that imports)
    is the one pinned.
    """
    pins: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        key = re.sub(r"[-_.]+", "-", name or "").lower()
        if key and key != "nodejob" and key not in pins:
            pins[key] = f"{name}=={dist.version}"
    return sorted(pins.values())


def staged_files(site: Path) -> dict[str, bytes]:
    """The staging folder's files keyed by archive path, minus what never runs from a zip."""
    files: dict[str, bytes] = {}
    for path in sorted(site.rglob("*")):
        name = path.relative_to(site).as_posix()
        if not path.is_file() or set(name.split("/")[:-1]) & SKIPPED_DIRS:
            continue
        if name.endswith(".pyi") or any(pattern.search(name) for pattern in DROPPED):
            continue
        files[name] = path.read_bytes()
    return files


def native_tops(files: dict[str, bytes]) -> set[str]:
    """Top-level entries holding compiled code, with auditwheel's ``*.libs`` folders."""
    tops = set()
    for name in files:
        top = name.partition("/")[0]
        if name.endswith(NATIVE_SUFFIXES) or top.endswith((".libs", ".dylibs")):
            tops.add(top)
    return tops


def import_name(top: str) -> str:
    """``apsw`` -> apsw, ``_cffi_backend.cpython-311-x86_64-linux-gnu.so`` -> _cffi_backend."""
    return top.partition(".")[0]


def glibc_needed(files: dict[str, bytes]) -> str | None:
    """The oldest glibc every platform wheel in the archive runs on, from its WHEEL tags."""
    needed: tuple[int, ...] = ()
    for name, data in files.items():
        if not name.endswith(".dist-info/WHEEL") or b"Root-Is-Purelib: true" in data:
            continue
        wheel_needs: list[tuple[int, ...]] = []
        for tag in re.findall(rb"^Tag: (\S+)$", data, re.MULTILINE):
            platform = tag.decode().split("-")[-1]
            match = re.match(r"manylinux_(\d+)_(\d+)_", platform)
            if match:
                wheel_needs.append((int(match[1]), int(match[2])))
            elif platform.split("_")[0] in MANYLINUX_LEGACY:
                wheel_needs.append(MANYLINUX_LEGACY[platform.split("_")[0]])
            elif platform.startswith("linux_"):  # built here: needs at least this glibc
                wheel_needs.append(glibc_version() or ())
        if wheel_needs:
            needed = max(needed, min(wheel_needs))
    return ".".join(map(str, needed)) or None


def app_build(files: dict[str, bytes], natives: set[str]) -> dict[str, Any]:
    """The build description of nodejob.pyz (see nodejob/_pyz_boot.py)."""
    platform = platform_tag()
    glibc = glibc_needed(files)
    native_hash = hashlib.sha256()
    for name in sorted(files):
        if name.partition("/")[0] in natives:
            native_hash.update(name.encode() + b"\0" + hashlib.sha256(files[name]).digest())
    tops = {import_name(name.partition("/")[0]) for name in files}
    needs = f"built for {platform}" + (f" (glibc {glibc} or newer)" if glibc else "")
    return {
        "nodejob": __version__,
        "python": list(sys.version_info[:2]),
        "exact_python": True,
        "needs": f"{needs}; build one for this Python with `python zipapp.py`",
        "entry": "nodejob.cli:main",
        "argv_command": None,
        "archive_tops": sorted(t for t in tops if t.isidentifier() and t not in natives),
        "native_tops": sorted(import_name(top) for top in natives),
        "platform": platform,
        "glibc": glibc,
        "native_id": f"{__version__}-{platform}-{native_hash.hexdigest()[:12]}",
    }


def build_app(output: Path, pip_args: list[str], *, pin: bool = True) -> dict[str, Any]:
    """Stage, compile and zip nodejob.pyz at `output`; returns its build description."""
    with tempfile.TemporaryDirectory(prefix="nodejob-zipapp-") as temp:
        work = Path(temp)
        stage(work / "site", work, pip_args, pin=pin)
        files = staged_files(work / "site")
    natives = native_tops(files)
    if not any(name.startswith("apsw/") for name in files):
        raise SystemExit("zipapp.py: pip did not install apsw; is the staging complete?")
    build = app_build(files, natives)
    archive = {
        (NATIVE_PREFIX + name if name.partition("/")[0] in natives else name): data
        for name, data in files.items()
    }
    archive.update(entry_files(APP_NAME, build))
    write_archive(output, with_bytecode(archive, APP_NAME, (NATIVE_PREFIX,)))
    return build


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python zipapp.py", description=__doc__.split("\n")[0])
    parser.add_argument("--worker", action="store_true", help=f"build dist/{WORKER_NAME} instead")
    parser.add_argument("--output", "-o", type=Path, help="where to write the archive")
    parser.add_argument(
        "--latest",
        action="store_true",
        help="let pip pick the newest dependency versions, not those installed here",
    )
    parser.add_argument(
        "--pip-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="pass ARG to pip install, e.g. --pip-arg=--constraint=pins.txt (repeatable)",
    )
    args = parser.parse_args(argv)
    started = time.perf_counter()
    if args.worker:
        output = args.output or ROOT / "dist" / WORKER_NAME
        build_worker_bundle(output)
        summary = "pure Python, runs on Python 3.11+"
    else:
        output = args.output or ROOT / "dist" / APP_NAME
        summary = app_build_summary(build_app(output, args.pip_arg, pin=not args.latest))
    size_mib = output.stat().st_size / 2**20
    elapsed = time.perf_counter() - started
    print(f"wrote {output} ({size_mib:.1f} MiB, {elapsed:.1f} s): {summary}")
    return 0


def app_build_summary(build: dict[str, Any]) -> str:
    glibc = f", glibc >= {build['glibc']}" if build["glibc"] else ""
    return f"for {build['platform']}{glibc}; native: {', '.join(build['native_tops'])}"


if __name__ == "__main__":
    sys.exit(main())
