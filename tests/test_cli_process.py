"""``python -m quantlab`` in a real process: signals, real read-only / full / permission-denied folders,
and what start-up imports.

Read-only (EROFS) and full (ENOSPC) folders are real where this machine allows a private mount
namespace (``unshare -rm``); permission denied (EACCES) is real as root once ``setpriv`` drops the
capabilities that bypass file modes; otherwise the test is skipped rather than faked (the in-process
tests in test_cli.py inject the same errors).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any

import pytest
from test_cli import ROOT, calibrate_argv, error_line, make_workspace, run_main, temp_entries

from quantlab.cli import ExitCode
from quantlab.cli.exits import Interrupted, install_signal_handlers, restore_signal_handlers


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return make_workspace(tmp_path)


# --------------------------------------------------------------------------- real file systems


def _namespace_shell() -> list[str]:
    probe = subprocess.run(["unshare", "-rm", "true"], check=False, capture_output=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("no private mount namespace here (unshare -rm): cannot make a real read-only or full disk")
    return ["unshare", "-rm", "sh", "-c"]


def _cli(*argv: str) -> str:
    return " ".join([sys.executable, "-m", "quantlab", *(f"'{a}'" for a in argv)])


@pytest.mark.parametrize("fs", ["read-only", "full"])
def test_real_read_only_and_full_file_systems(ws: Path, fs: str) -> None:
    shell = _namespace_shell()
    mnt = ws / "mnt"
    mnt.mkdir()
    argv = calibrate_argv(ws, mnt / "out")
    if fs == "read-only":
        setup = f"mount -t tmpfs -o size=1m tmpfs '{mnt}' && mount -o remount,ro '{mnt}'"
    else:
        setup = f"mount -t tmpfs -o size=16k tmpfs '{mnt}' && head -c 12288 /dev/zero > '{mnt}/filler'"
    script = f"{setup} && {{ {_cli(*argv)}; rc=$?; echo LISTING; ls -A '{mnt}'; exit $rc; }}"
    proc = subprocess.run([*shell, script], check=False, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == ExitCode.ENVIRONMENT, proc.stderr
    line = error_line(proc.stderr, "calibrate")
    assert str(mnt) in line and ("read-only" in line.lower() if fs == "read-only" else "full" in line)
    left = proc.stdout.split("LISTING\n", 1)[1].split()
    assert left == ([] if fs == "read-only" else ["filler"])  # no output, no temporary file on that disk


def test_real_permission_denied_as_root(ws: Path) -> None:
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root with setpriv (a normal user gets EACCES from chmod alone: covered by the injection)")
    locked = ws / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    argv = calibrate_argv(ws, locked / "out")
    proc = subprocess.run(check=False, args=["setpriv", "--bounding-set", "-dac_override,-dac_read_search", sys.executable, "-m",
                           "quantlab", *argv],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    if proc.returncode == 0:
        pytest.skip("setpriv could not drop the capabilities here")
    assert proc.returncode == ExitCode.ENVIRONMENT, proc.stderr
    assert str(locked / "out") in error_line(proc.stderr, "calibrate")
    assert list(locked.iterdir()) == []


# --------------------------------------------------------------------------- signals


def test_sigterm_while_writing_removes_the_temp_files(ws: Path, capfd: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """In process: SIGTERM arrives while statistics.npz is half-written inside the temporary folder."""
    import quantlab.stats

    out = ws / "cal"
    assert run_main(calibrate_argv(ws, out), capfd)[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = quantlab.stats.save_statistics

    def interrupted(statistics: object, target: Path) -> None:
        Path(target).write_bytes(b"half")
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        real(statistics, target)  # type: ignore[arg-type]

    monkeypatch.setattr(quantlab.stats, "save_statistics", interrupted)
    handler_before = signal.getsignal(signal.SIGTERM)
    code, _, err = run_main(calibrate_argv(ws, out), capfd)
    assert code == ExitCode.SIGTERM
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("quantlab calibrate: interrupted (SIGTERM) while writing ")
    assert str(out) in lines[-1] and "nothing half-written" in lines[-1] and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert temp_entries(ws) == []
    assert signal.getsignal(signal.SIGTERM) == handler_before  # main() put the handlers back


SLOW_WRITE = """\
import os, pathlib, runpy, sys, time
marker = pathlib.Path(sys.argv[1])
real_replace = os.replace
def slow_replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(src)).endswith(".tmp"):
        marker.touch()
        time.sleep(60)
    return real_replace(src, dst, *args, **kwargs)
os.replace = slow_replace
sys.argv = ["quantlab", *sys.argv[2:]]
runpy.run_module("quantlab", run_name="__main__", alter_sys=True)
"""


def _signalled(proc: subprocess.Popen[str], signum: int, ready: Callable[[], None]) -> str:
    """Waits for ``ready()``, sends ``signum`` and returns the process's stderr; kills it if anything fails."""
    try:
        ready()
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return err


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_while_writing_in_a_real_process(ws: Path, signum: int, code: int) -> None:
    marker = ws / "writing.marker"
    out = ws / "cal"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITE, str(marker), *calibrate_argv(ws, out)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def writing() -> None:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "never started writing"
            time.sleep(0.05)

    err = _signalled(proc, signum, writing)
    assert proc.returncode == code, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert lines[-1].startswith(f"quantlab calibrate: interrupted ({signal.Signals(signum).name}) while writing")
    assert not out.exists() and temp_entries(ws) == []


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_during_start_up_imports(ws: Path, signum: int, code: int) -> None:
    """The signal lands while numba (the heaviest import) is being imported: one line, no KeyboardInterrupt."""
    proc = subprocess.Popen([sys.executable, "-X", "importtime", "-m", "quantlab", *calibrate_argv(ws, ws / "cal")],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def importing_numba() -> None:
        deadline = time.monotonic() + 60
        line = ""
        while "numba" not in line:  # import time lines of numba's submodules: numba is loading
            line = proc.stderr.readline()  # type: ignore[union-attr]
            assert line or proc.poll() is None, "finished before importing numba"
            assert time.monotonic() < deadline

    err = _signalled(proc, signum, importing_numba)
    err = "\n".join(line for line in err.splitlines() if not line.startswith("import time:"))
    assert proc.returncode == code, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith(f"quantlab calibrate: interrupted ({signal.Signals(signum).name}) while ")
    assert not (ws / "cal").exists()


# --------------------------------------------------------------------------- start-up imports

HEAVY = ("onnxruntime", "pandas", "numba", "matplotlib", "torch", "onnx")


LOADED = """\
import atexit, runpy, sys
atexit.register(lambda: print("LOADED", *sorted(sys.modules)))
sys.argv = ["quantlab", *sys.argv[1:]]
runpy.run_module("quantlab", run_name="__main__", alter_sys=True)
"""


def _imported_modules(*argv: str) -> set[str]:
    """Every module imported by ``python -m quantlab ARGV``: what -X importtime logs, and sys.modules at exit
    (importtime does not log modules loaded through importlib.import_module)."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", LOADED, *argv], check=False, cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    logged = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    at_exit = proc.stdout.rsplit("LOADED", 1)[-1].split()
    assert at_exit, proc.stdout[-2000:] + proc.stderr[-2000:]
    return logged | set(at_exit)


COMMANDS = ("calibrate", "build", "perf", "compare", "search", "run", "sweep", "report", "export", "demo")
LIGHT = [("--help",), ("nonsense",), *((c, "--help") for c in COMMANDS), *((c, "--bogus") for c in COMMANDS)]


@pytest.mark.parametrize("argv", LIGHT, ids=" ".join)
def test_help_and_usage_errors_import_no_heavy_library(argv: tuple[str, ...]) -> None:
    """Start-up in well under a second: help and argument errors never load ONNX Runtime, onnx, pandas, numba,
    matplotlib or torch (option defaults come from light modules; packages resolve names lazily)."""
    loaded = _imported_modules(*argv)
    assert "quantlab.cli" in loaded
    heavy = sorted(m for m in loaded if m.split(".")[0] in HEAVY)
    assert heavy == []


def test_the_calibration_library_loads_no_table_or_plot_library() -> None:
    """``import quantlab.calibrate`` (all a calibration needs) leaves pandas, tqdm, matplotlib and torch
    unloaded: pandas and tqdm's notebook probe were 0.5 s of every calibration's wall time."""
    proc = subprocess.run([sys.executable, "-c", "import sys, quantlab.calibrate; print(*sorted(sys.modules))"],
                          check=True, cwd=ROOT, capture_output=True, text=True, timeout=120)
    loaded = set(proc.stdout.split())
    assert "quantlab.calibrate" in loaded
    assert sorted(m for m in loaded if m.split(".")[0] in ("pandas", "tqdm", "matplotlib", "torch")) == []


_IMPORT_EACH_FIRST = r"""
import importlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
names = sorted(".".join(p.relative_to(root.parent).with_suffix("").parts).removesuffix(".__init__")
               for p in root.rglob("*.py") if p.name != "__main__.py")
names = names[int(sys.argv[2])::int(sys.argv[3])]  # this process's share
failed = []
for name in names:
    for loaded in [m for m in sys.modules if m == "quantlab" or m.startswith("quantlab.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed.append(f"{name}: {type(exc).__name__}: {exc}")
print(len(names))
print("\n".join(failed))
"""


def test_every_module_imports_first_without_a_cycle() -> None:
    """Each module imported first, as a user's ``from quantlab.controlflow import ...`` would (third-party
    libraries stay loaded between modules, quantlab's are dropped): an import cycle shows up as an
    ImportError on a partially initialised module."""
    package = ROOT / "quantlab"
    shares = 2  # two processes, one per core: the modules split between them
    procs = [subprocess.Popen([sys.executable, "-c", _IMPORT_EACH_FIRST, str(package), str(k), str(shares)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
             for k in range(shares)]
    count, failed = 0, []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        first, *rest = out.strip().split("\n")
        count += int(first)
        failed += [f for f in rest if f]
    assert count > 80
    assert failed == []


# --------------------------------------------------------------------------- where a signal must not raise


def _frame_in(filename: str) -> FrameType:
    """A real frame whose code comes from ``filename`` (importlib's frozen bootstrap, say)."""
    scope: dict[str, Any] = {"sys": sys}
    exec(compile("frame = sys._getframe()", filename, "exec"), scope)  # noqa: S102 - our own constant source
    return scope["frame"]


def _raised_within(seconds: float) -> BaseException | None:
    """Run plain Python bytecode for up to ``seconds``; the exception a signal handler raised in it, if any."""
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            sum(range(100))
    except KeyboardInterrupt as exc:
        return exc
    return None


def test_a_signal_in_importlib_frames_waits_until_the_main_thread_leaves_them() -> None:
    """Raised inside a module lock's weakref callback the exception would leave the global import lock held
    (the next import hangs): the handler defers it and SIGALRM delivers it outside importlib."""
    previous = install_signal_handlers()
    try:
        bootstrap = _frame_in("<frozen importlib._bootstrap>")
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        handler(signal.SIGTERM, bootstrap)  # returns: nothing raised inside importlib
        retry = signal.getsignal(signal.SIGALRM)
        assert callable(retry) and signal.getitimer(signal.ITIMER_REAL)[0] > 0
        signal.setitimer(signal.ITIMER_REAL, 0.0)
        retry(signal.SIGALRM, bootstrap)  # still inside: waits again
        assert signal.getitimer(signal.ITIMER_REAL)[0] > 0
        exc = _raised_within(5.0)  # the next retry lands in this test's own frame
        assert isinstance(exc, Interrupted) and exc.signum == signal.SIGTERM
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # held while the run unwinds
    finally:
        restore_signal_handlers(previous)
    assert signal.getsignal(signal.SIGALRM) == previous[signal.SIGALRM]
    assert signal.getitimer(signal.ITIMER_REAL)[0] == 0


def test_an_interruption_dropped_by_a_weakref_callback_is_delivered_again() -> None:
    """Python drops exceptions raised in finalizers ("Exception ignored in ..."); the interruption is not lost."""
    previous = install_signal_handlers()
    try:

        class Owner:
            pass

        def callback(_ref: Any) -> None:
            raise Interrupted(signal.SIGINT)

        owner = Owner()
        ref = weakref.ref(owner, callback)
        del owner  # the callback raises; Python passes the exception to sys.unraisablehook
        assert ref() is None
        exc = _raised_within(5.0)
        assert isinstance(exc, Interrupted) and exc.signum == signal.SIGINT
    finally:
        restore_signal_handlers(previous)
    assert sys.unraisablehook is previous[-1]


def test_the_signal_handler_raises_at_once_in_ordinary_code() -> None:
    previous = install_signal_handlers()
    try:
        handler = signal.getsignal(signal.SIGINT)
        assert callable(handler)
        with pytest.raises(Interrupted):
            handler(signal.SIGINT, _frame_in(__file__))
        assert signal.getitimer(signal.ITIMER_REAL)[0] == 0
    finally:
        restore_signal_handlers(previous)
