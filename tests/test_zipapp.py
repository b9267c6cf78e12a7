"""The single-file archives, built for real and run as a user would: dist/nodejob.pyz
(``python zipapp.py``) and the pure-Python worker bundle (``--worker``, `worker_bundle_path`).

Archives run under ``sys.executable -I -S``: no user site and no site-packages, so nothing
installed here (this checkout's editable install included) can stand in for what the archive
must carry. Each test gets a fresh XDG_CACHE_HOME and HOME unless it shares the module's.
The full build pip-installs the dependencies once per module (~15 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import zipfile
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import trio
import trio_websocket

from nodejob import __version__, _pyz_boot, bundle, protocol

if TYPE_CHECKING:
    from collections.abc import Iterator

ROOT = Path(__file__).resolve().parents[1]
GRAPH: dict[str, Any] = {
    "nodes": [
        {"id": "a", "type": "nodejob.Constant", "data": {"value": 2}},
        {"id": "b", "type": "nodejob.Add", "data": {"b": 3}},
        {"id": "out", "type": "nodejob.Output", "data": {"name": "sum"}},
    ],
    "edges": [
        {"source": "a", "sourceHandle": "output", "target": "b", "targetHandle": "a"},
        {"source": "b", "sourceHandle": "output", "target": "out", "targetHandle": "value"},
    ],
}
WORKER_TOPS = {"nodejob", *bundle.WORKER_DEPENDENCIES}


def isolated(*args: str | Path) -> list[str]:
    """A command line for this interpreter with nothing of site-packages."""
    return [sys.executable, "-I", "-S", *map(str, args)]


def run(
    command: list[str], env: dict[str, str], cwd: Path, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        command, env=env, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=120
    )


def environment(base: Path) -> dict[str, str]:
    """os.environ with its own cache and home under `base` (PYTHON* are ignored by -I)."""
    (base / "home").mkdir(parents=True, exist_ok=True)
    return {**os.environ, "XDG_CACHE_HOME": str(base / "cache"), "HOME": str(base / "home")}


def build_info(archive: Path) -> dict[str, Any]:
    with zipfile.ZipFile(archive) as files:
        info: dict[str, Any] = json.loads(files.read(bundle.BUILD_INFO))
        return info


@pytest.fixture(scope="module")
def app(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """dist/nodejob.pyz, built once for this module into a temporary folder."""
    output = tmp_path_factory.mktemp("dist") / "nodejob.pyz"
    done = subprocess.run(
        [sys.executable, "zipapp.py", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def worker_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    output = tmp_path_factory.mktemp("dist") / "nodejob-worker.pyz"
    done = subprocess.run(
        [sys.executable, "zipapp.py", "--worker", "--output", str(output)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return output


@pytest.fixture(scope="module")
def shared_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One cache for the tests that do not care about first runs."""
    return environment(tmp_path_factory.mktemp("shared"))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    return environment(tmp_path / "env")


@pytest.fixture
def cwd(tmp_path: Path) -> Path:
    """Somewhere that is not the checkout."""
    path = tmp_path / "cwd"
    path.mkdir()
    return path


# -- nodejob.pyz ----------------------------------------------------------------------------------


def test_version_runs_from_any_directory_and_extracts_natives_once(
    app: Path, env: dict[str, str], cwd: Path
) -> None:
    first = run(isolated(app, "--version"), env, cwd)
    assert (first.returncode, first.stdout.strip()) == (0, f"nodejob {__version__}"), first.stderr
    root = Path(env["XDG_CACHE_HOME"]) / "nodejob" / "pyz"
    native = root / build_info(app)["native_id"]
    assert sorted(os.listdir(root)) == [native.name]  # and no temporary directory left
    assert (native / _pyz_boot.MARKER).is_file()
    assert list(native.glob("apsw/__init__*.so"))
    marker_inode = (native / _pyz_boot.MARKER).stat().st_ino

    again = run(isolated(app, "--version"), env, cwd)
    assert again.returncode == 0, again.stderr
    assert (native / _pyz_boot.MARKER).stat().st_ino == marker_inode  # reused, not redone


def test_archive_states_its_platform(app: Path) -> None:
    info = build_info(app)
    assert info["platform"] == _pyz_boot.platform_tag()
    assert info["python"] == list(sys.version_info[:2])
    assert info["exact_python"] is True
    assert info["nodejob"] == __version__
    assert {"apsw", "pydantic_core"} <= set(info["native_tops"])
    assert {"nodejob", "nodejob_tui", "trio", "quart_trio", "textual"} <= set(info["archive_tops"])
    assert info["platform"] in info["needs"]
    assert info["native_id"].startswith(f"{__version__}-{info['platform']}-")
    with zipfile.ZipFile(app) as files:
        names = set(files.namelist())
    assert not [name for name in names if name.endswith(".so") and not name.startswith(".native/")]
    assert "nodejob/cli.pyc" in names  # legacy bytecode next to the source
    assert "nodejob/schema.sql" in names


def test_pyz_info_imports_the_native_modules(
    app: Path, shared_env: dict[str, str], cwd: Path
) -> None:
    done = run(isolated(app, "--pyz-info"), shared_env, cwd)
    assert done.returncode == 0, done.stderr
    info = json.loads(done.stdout)
    native_dir = info["native_dir"]
    assert native_dir.startswith(shared_env["XDG_CACHE_HOME"])
    assert set(info["native_imports"]) >= {"apsw", "pydantic_core"}
    for name, where in info["native_imports"].items():
        assert where.startswith(native_dir), (name, where)


def test_archive_wins_over_an_installed_nodejob(
    app: Path, shared_env: dict[str, str], cwd: Path
) -> None:
    """Under plain ``-I`` site-packages (with this checkout's editable install) is live."""
    done = run([sys.executable, "-I", "-v", str(app), "--version"], shared_env, cwd)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == f"nodejob {__version__}"
    imports = [line for line in done.stderr.splitlines() if line.startswith("import 'nodejob")]
    assert imports
    assert all(f'<zipimporter object "{app}/' in line for line in imports), imports


def test_every_nodejob_module_imports_from_the_archive(
    app: Path, shared_env: dict[str, str], cwd: Path
) -> None:
    code = f"""
import importlib, json, sys, zipfile
archive = {str(app)!r}
sys.path.insert(0, archive)
from nodejob import _pyz_boot
build = json.loads(zipfile.ZipFile(archive).read("nodejob-build.json"))
sys.path.insert(1, _pyz_boot.native_dir(archive, build))
failed = {{}}
for name in zipfile.ZipFile(archive).namelist():
    top = name.partition("/")[0]
    if top in ("nodejob", "nodejob_tui") and name.endswith(".py") and "__main__" not in name:
        module = name[:-3].removesuffix("/__init__").replace("/", ".")
        try:
            importlib.import_module(module)
        except BaseException as exc:
            failed[module] = repr(exc)
        else:
            assert sys.modules[module].__file__.startswith(archive), module
print(json.dumps(failed))
"""
    done = run(isolated("-c", code), shared_env, cwd)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == {}


def test_two_first_runs_at_once_both_succeed(app: Path, env: dict[str, str], cwd: Path) -> None:
    """Real processes racing to extract into an empty cache, released together."""
    code = f"""
import sys, json, zipfile
archive = {str(app)!r}
sys.path.insert(0, archive)
from nodejob import _pyz_boot
build = json.loads(zipfile.ZipFile(archive).read("nodejob-build.json"))
print("ready", flush=True)
sys.stdin.readline()
native = _pyz_boot.native_dir(archive, build)
sys.path.insert(1, native)
import apsw, pydantic_core
assert apsw.__file__.startswith(native) and pydantic_core.__file__.startswith(native)
print(native, apsw.sqlite_lib_version(), flush=True)
"""
    racers = [
        subprocess.Popen(
            isolated("-c", code),
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline() == "ready\n"
        for racer in racers:
            assert racer.stdin is not None
            racer.stdin.write("go\n")
            racer.stdin.flush()
        results = [racer.communicate(timeout=120) for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
    assert [racer.returncode for racer in racers] == [0] * 4, [err for _, err in results]
    assert len({out for out, _ in results}) == 1
    root = Path(env["XDG_CACHE_HOME"]) / "nodejob" / "pyz"
    assert os.listdir(root) == [build_info(app)["native_id"]]  # losers cleaned up after them

    # And two whole archives starting at once on a fresh cache.
    (Path(env["XDG_CACHE_HOME"]) / "nodejob").rename(Path(env["XDG_CACHE_HOME"]) / "old")
    both = [
        subprocess.Popen(isolated(app, "--pyz-info"), env=env, cwd=cwd, stdout=subprocess.PIPE)
        for _ in range(2)
    ]
    assert [process.wait(timeout=120) for process in both] == [0, 0]
    for process in both:
        assert process.stdout is not None
        process.stdout.close()
    assert os.listdir(root) == [build_info(app)["native_id"]]


def test_damaged_cache_is_replaced(app: Path, env: dict[str, str], cwd: Path) -> None:
    assert run(isolated(app, "--version"), env, cwd).returncode == 0
    native = Path(env["XDG_CACHE_HOME"]) / "nodejob" / "pyz" / build_info(app)["native_id"]
    (native / _pyz_boot.MARKER).unlink()  # as if someone had deleted files by hand
    done = run(isolated(app, "--pyz-info"), env, cwd)
    assert done.returncode == 0, done.stderr
    assert (native / _pyz_boot.MARKER).is_file()
    assert os.listdir(native.parent) == [native.name]


def test_unwritable_cache_fails_in_one_line(app: Path, env: dict[str, str], cwd: Path) -> None:
    blocker = Path(env["XDG_CACHE_HOME"])
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("a file where the cache directory should be")
    done = run(isolated(app, "--version"), env, cwd)
    assert done.returncode == _pyz_boot.EXIT_MISMATCH
    assert "Traceback" not in done.stderr
    assert "cannot extract the native modules" in done.stderr
    assert "XDG_CACHE_HOME" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


async def test_server_from_the_archive_runs_a_job_over_websocket(
    app: Path, env: dict[str, str], cwd: Path
) -> None:
    """serve, run, attach: all from the archive, in a fresh home, with a real WebSocket."""
    home = cwd / "nodejob-home"
    async with trio.open_nursery() as nursery:
        server, url = await _start_server(nursery, app, home, env, cwd)
        job_id, messages = await _run_over_websocket(url, home, {"graph": GRAPH})
        assert messages[-1]["status"] == "completed", messages[-1]
        assert messages[-1]["result"]["outputs"] == {"sum": 5}

        client = ["--url", url, "--home", str(home), "--json"]
        with trio.fail_after(60):
            attach = await trio.run_process(
                isolated(app, "attach", job_id, *client), capture_stdout=True, env=env, cwd=cwd
            )
        replayed = [json.loads(line) for line in attach.stdout.decode().splitlines()]
        assert replayed == messages

        graph_file = cwd / "graph.json"
        graph_file.write_text(json.dumps(GRAPH))
        with trio.fail_after(60):
            ran = await trio.run_process(
                isolated(app, "run", graph_file, *client), capture_stdout=True, env=env, cwd=cwd
            )
        last = json.loads(ran.stdout.decode().splitlines()[-1])
        assert (last["status"], last["result"]) == ("completed", {"outputs": {"sum": 5}})

        server.send_signal(signal.SIGINT)
    assert server.returncode == 0


async def test_server_from_the_archive_runs_subprocess_jobs_with_the_worker_bundle(
    app: Path, env: dict[str, str], cwd: Path
) -> None:
    """From the zip, the server builds the worker bundle out of the zip's own files."""
    home = cwd / "nodejob-home"
    async with trio.open_nursery() as nursery:
        server, url = await _start_server(nursery, app, home, env, cwd)
        data = {"graph": GRAPH, "execution_strategy": "subprocess"}
        _, messages = await _run_over_websocket(url, home, data)
        assert messages[-1]["status"] == "completed", messages[-1]
        assert messages[-1]["result"]["outputs"] == {"sum": 5}
        bundles = os.listdir(home / bundle.BUNDLES_DIR)
        assert len(bundles) == 1
        assert bundles[0].startswith(f"nodejob-worker-{__version__}-")
        server.send_signal(signal.SIGINT)
    assert server.returncode == 0


async def _start_server(
    nursery: trio.Nursery, app: Path, home: Path, env: dict[str, str], cwd: Path
) -> tuple[trio.Process, str]:
    """``nodejob.pyz serve --port 0`` in `nursery`; returns it and its ``http://`` URL."""
    server: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            isolated(app, "serve", "--port", "0", "--home", home),
            stdout=subprocess.PIPE,
            env=env,
            cwd=cwd,
            check=False,
        )
    )
    assert server.stdout is not None
    with trio.fail_after(60):
        return server, await _ready_url(server.stdout, nursery)


async def _run_over_websocket(
    url: str, home: Path, data: dict[str, Any]
) -> tuple[str, list[dict[str, Any]]]:
    """``run_job`` over /ws, then the job's messages up to the terminal job_update."""
    token = (home / "token").read_text().strip()
    ws_url = url.replace("http://", "ws://") + f"/ws?token={token}"
    with trio.fail_after(60):
        async with trio_websocket.open_websocket_url(ws_url) as ws:
            await ws.send_message(json.dumps({"command": "run_job", "data": data}))
            reply = json.loads(await ws.get_message())
            assert reply["message"] == "Job started", reply
            messages: list[dict[str, Any]] = []
            while not messages or not protocol.is_terminal_update(messages[-1]):
                messages.append(json.loads(await ws.get_message()))
    assert [message["seq"] for message in messages] == list(range(1, len(messages) + 1))
    assert {message["job_id"] for message in messages} == {reply["job_id"]}
    return reply["job_id"], messages


async def _ready_url(stdout: trio.abc.ReceiveStream, nursery: trio.Nursery) -> str:
    """Read the server's stdout up to its ``http://`` line; keep draining it afterwards."""
    buffer = b""
    while b"\n" not in buffer or b"http://" not in buffer.rpartition(b"\n")[0]:
        chunk = await stdout.receive_some()
        assert chunk, f"server exited before it was ready: {buffer!r}"
        buffer += chunk
    line = next(line for line in buffer.decode().splitlines() if "http://" in line)
    nursery.start_soon(_drain, stdout)
    return "http://" + line.split("http://")[1].split()[0]


async def _drain(stream: trio.abc.ReceiveStream) -> None:
    while await stream.receive_some():
        pass


# -- a wrong interpreter ------------------------------------------------------------------------


def _fake_archive(tmp_path: Path, **changes: Any) -> Path:
    """A tiny archive with the real boot code and a build description that does not fit."""
    build = {
        "nodejob": __version__,
        "python": list(sys.version_info[:2]),
        "exact_python": True,
        "needs": "built for cpython-3.11-linux-sparc64",
        "entry": "nodejob.cli:main",
        "argv_command": None,
        "archive_tops": ["nodejob"],
        "native_tops": ["fake_native"],
        "platform": _pyz_boot.platform_tag(),
        "glibc": None,
        "native_id": "test",
        **changes,
    }
    files = {"nodejob/_pyz_boot.py": (ROOT / "nodejob" / "_pyz_boot.py").read_bytes()}
    files.update(bundle.entry_files("fake.pyz", build))
    return bundle.write_archive(tmp_path / "fake.pyz", files)


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"python": [3, 10]}, id="python-version"),
        pytest.param({"python": [3, 99], "exact_python": False}, id="python-too-old"),
        pytest.param({"platform": "cpython-3.11-linux-sparc64"}, id="platform"),
        pytest.param({"glibc": "99.0"}, id="glibc"),
    ],
)
def test_mismatched_interpreter_gets_one_clear_line(
    tmp_path: Path, env: dict[str, str], cwd: Path, changes: dict[str, Any]
) -> None:
    done = run(isolated(_fake_archive(tmp_path, **changes), "--version"), env, cwd)
    assert done.returncode == _pyz_boot.EXIT_MISMATCH
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("fake.pyz: built for cpython-3.11-linux-sparc64")
    assert sys.executable in lines[0] or "glibc" in lines[0]


# -- the worker bundle ----------------------------------------------------------------------------


def _bundle_tops(archive: Path) -> set[str]:
    with zipfile.ZipFile(archive) as files:
        names = files.namelist()
    assert not [name for name in names if name.endswith((".so", ".pyd", ".dylib"))]
    return {name.partition("/")[0] for name in names if "/" in name}


def test_worker_bundle_holds_only_pure_python(worker_bundle: Path) -> None:
    tops = _bundle_tops(worker_bundle)
    assert tops == {*WORKER_TOPS, f"nodejob-{__version__}.dist-info"}
    with zipfile.ZipFile(worker_bundle) as files:
        nodejob_files = {name for name in files.namelist() if name.startswith("nodejob/")}
    assert "nodejob/protocol.py" in nodejob_files
    assert "nodejob/workflow/runner.py" in nodejob_files
    assert not {"nodejob/store.py", "nodejob/cli.py", "nodejob/server/"} & nodejob_files
    assert build_info(worker_bundle)["exact_python"] is False


def test_worker_bundle_runs_a_graph_under_isolated_python(
    worker_bundle: Path, env: dict[str, str], cwd: Path
) -> None:
    """The engine the worker drives, imported from the bundle alone, runs a graph."""
    code = f"""
import json, sys
sys.path.insert(0, {str(worker_bundle)!r})
import trio
from nodejob.workflow import run_graph, validate_graph

class Collect:
    def __init__(self): self.messages = []
    def emit(self, message): self.messages.append(message)
    async def drain(self): pass

emitter = Collect()
outputs = trio.run(run_graph, validate_graph(json.loads(sys.stdin.read())), {{}}, emitter)
assert all(m.__spec__.origin.startswith({str(worker_bundle)!r})
           for n, m in sys.modules.items() if n.startswith(("nodejob", "trio")) and m.__spec__)
print(json.dumps(outputs))
"""
    done = run(isolated("-c", code), env, cwd, stdin=json.dumps(GRAPH))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"sum": 5}


def test_worker_bundle_runs_the_real_worker(
    worker_bundle: Path, env: dict[str, str], cwd: Path
) -> None:
    """`nodejob worker` itself, from the bundle alone: help, then one job from stdin."""
    helped = run(isolated(worker_bundle, "worker", "--help"), env, cwd)
    assert helped.returncode == 0, helped.stderr
    assert helped.stdout.startswith("usage: nodejob worker")

    for command in (["worker"], []):  # `nodejob worker ARGS` and plain `ARGS` alike
        done = run(isolated(worker_bundle, *command), env, cwd, stdin=_worker_request(5))
        _assert_job_ran(done, first_seq=5)


def _worker_request(first_seq: int = 1) -> str:
    return json.dumps({"job_id": "j1", "first_seq": first_seq, "graph": GRAPH, "params": {}})


def _assert_job_ran(done: subprocess.CompletedProcess[str], first_seq: int = 1) -> None:
    """The worker's stdout: seq-numbered JSON lines ending in a completed job_update."""
    assert done.returncode == 0, done.stderr
    messages = [json.loads(line) for line in done.stdout.splitlines()]
    assert [m["seq"] for m in messages] == list(range(first_seq, first_seq + len(messages)))
    assert {m["job_id"] for m in messages} == {"j1"}
    assert messages[-1]["type"] == "job_update"
    assert messages[-1]["status"] == "completed"
    assert messages[-1]["result"] == {"outputs": {"sum": 5}}


def test_worker_command_from_the_archive(app: Path, shared_env: dict[str, str], cwd: Path) -> None:
    """The full archive runs `worker` too (with its native modules present but unused)."""
    _assert_job_ran(run(isolated(app, "worker"), shared_env, cwd, stdin=_worker_request()))


def test_worker_bundle_path_builds_once_and_atomically(tmp_path: Path) -> None:
    home = tmp_path / "home"
    paths: list[Path] = []
    threads = [
        threading.Thread(target=lambda: paths.append(bundle.worker_bundle_path(home)))
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(paths) == 4
    assert len(set(paths)) == 1
    path = paths[0]
    assert path.parent == home / bundle.BUNDLES_DIR
    assert path.name.startswith(f"nodejob-worker-{__version__}-")
    assert os.listdir(path.parent) == [path.name]  # no temporary file left
    assert os.access(path, os.X_OK)
    inode = path.stat().st_ino
    assert bundle.worker_bundle_path(home) == path
    assert path.stat().st_ino == inode
    assert _bundle_tops(path) == {*WORKER_TOPS, f"nodejob-{__version__}.dist-info"}


def test_worker_bundle_path_from_processes_at_once(
    tmp_path: Path, env: dict[str, str], cwd: Path
) -> None:
    home = tmp_path / "home"
    code = f"""
import sys
from nodejob.bundle import worker_bundle_path
print("ready", flush=True)
sys.stdin.readline()
print(worker_bundle_path({str(home)!r}))
"""
    racers = [
        subprocess.Popen(
            [sys.executable, "-I", "-c", code],  # the installed nodejob, as the server has it
            env=env,
            cwd=cwd,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(3)
    ]
    try:
        for racer in racers:
            assert racer.stdout is not None
            assert racer.stdout.readline() == "ready\n"
        results = [racer.communicate("go\n", timeout=120)[0] for racer in racers]
    finally:
        for racer in racers:
            racer.kill()
            racer.wait()
    assert [racer.returncode for racer in racers] == [0, 0, 0]
    assert len(set(results)) == 1
    assert os.listdir(home / bundle.BUNDLES_DIR) == [Path(results[0].strip()).name]


def test_worker_bundle_path_works_inside_the_pyz(
    app: Path, tmp_path: Path, shared_env: dict[str, str], cwd: Path
) -> None:
    """The server running from nodejob.pyz builds the bundle from the zip's own files."""
    home = tmp_path / "home"
    code = f"""
import sys
sys.path.insert(0, {str(app)!r})
from nodejob.bundle import worker_bundle_path
import nodejob, trio
assert nodejob.__file__.startswith({str(app)!r}) and trio.__file__.startswith({str(app)!r})
print(worker_bundle_path({str(home)!r}))
"""
    done = run(isolated("-c", code), shared_env, cwd)
    assert done.returncode == 0, done.stderr
    path = Path(done.stdout.strip())
    assert _bundle_tops(path) == {*WORKER_TOPS, f"nodejob-{__version__}.dist-info"}
    check = run(
        isolated("-c", f"import sys; sys.path.insert(0, {str(path)!r}); import nodejob.workflow"),
        shared_env,
        cwd,
    )
    assert check.returncode == 0, check.stderr


def _other_pythons() -> Iterator[Path]:
    """Other CPython 3.11+ interpreters on this machine (pyenv's, say), if there are any."""
    seen = {Path(sys.executable).resolve()}
    roots = [Path.home() / ".pyenv" / "versions", Path("/usr/bin"), Path("/usr/local/bin")]
    for root in roots:
        for candidate in sorted(root.glob("*/bin/python3.1[1-9]")) + sorted(
            root.glob("python3.1[1-9]")
        ):
            if candidate.is_file() and candidate.resolve() not in seen:
                seen.add(candidate.resolve())
                yield candidate


@pytest.mark.parametrize("python", list(_other_pythons()) or [None], ids=str)
def test_worker_bundle_runs_under_other_pythons(
    worker_bundle: Path, env: dict[str, str], cwd: Path, python: Path | None
) -> None:
    """Its pycs are for this Python: another version must fall back to the sources."""
    if python is None:
        pytest.skip("no other Python 3.11+ on this machine")
    command = [str(python), "-I", "-S", str(worker_bundle), "worker"]
    _assert_job_ran(run(command, env, cwd, stdin=_worker_request()))


# -- the builder's own checks ---------------------------------------------------------------------


def test_bundle_refuses_a_module_that_imports_outside_it() -> None:
    ok = b"""
from __future__ import annotations
import json
from typing import TYPE_CHECKING
import trio
from nodejob import protocol
from . import protocol as again
if TYPE_CHECKING:
    from nodejob.store import Store
try:
    import docker
except ImportError:
    docker = None
def later():
    import nodejob.server
"""
    files = {"nodejob/__init__.py": b"", "nodejob/protocol.py": b"", "nodejob/worker.py": ok}
    elsewhere = ["nodejob.store", "nodejob.server", "nodejob.server.app", "nodejob.config"]
    bundle.check_imports(files, bundle.WORKER_DEPENDENCIES, elsewhere)
    for bad, named in (
        (b"import nodejob.store\n", "nodejob.store"),
        (b"from nodejob import store\n", "nodejob.store"),
        (b"from nodejob.server import app\n", "nodejob.server"),
        (b"from .config import Config\n", "nodejob.config"),
        (b"import docker\n", "docker"),
        (b"if True:\n    from quart import Quart\n", "quart"),
    ):
        bad_files = {**files, "nodejob/worker.py": bad}
        with pytest.raises(bundle.BundleError, match=named.replace(".", r"\.")):
            bundle.check_imports(bad_files, bundle.WORKER_DEPENDENCIES, elsewhere)


def test_pyc_falls_back_to_source_for_a_foreign_magic_number(tmp_path: Path) -> None:
    """An archive's pycs are for the builder's Python; another one must compile the source."""
    files = {"probe.py": b"VALUE = 42\n"}
    compiled = bundle.with_bytecode(files, "probe.pyz")
    assert compiled["probe.pyc"].startswith(importlib.util.MAGIC_NUMBER)
    foreign = {**compiled, "probe.pyc": b"\x00\x00\r\n" + compiled["probe.pyc"][4:]}
    archive = bundle.write_archive(tmp_path / "probe.pyz", foreign)
    code = f"import sys; sys.path.insert(0, {str(archive)!r}); import probe; print(probe.VALUE)"
    done = subprocess.run(isolated("-c", code), capture_output=True, text=True, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, "42"), done.stderr
