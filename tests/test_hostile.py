"""Hostile input through the real CLI entry point: every failure is one clear line with its own exit code.

Exit codes (issue 11): 0 ok, 1 verdict, 2 bad input or usage, 3 environment (permission, read-only,
disk full, out of memory, missing backend), 130 SIGINT, 143 SIGTERM. Every case below asserts

- the exit code;
- exactly one ``quantlab CMD: error:`` line on stderr, the last one, naming the file / tensor / input /
  key at fault (and not giving advice that is wrong for the case: ``absent``);
- no ``Traceback`` on stdout or stderr;
- nothing outside the command's own files changed: every file of the case folder (the model, the data,
  the user's notes, earlier outputs) is byte-identical afterwards, nothing new appeared, and no
  ``.NAME.XXXX.tmp`` temp file or folder was left behind.

Most cases run in-process (``quantlab.cli.main([...])``, stdout/stderr captured at the file-descriptor
level, so ONNX Runtime's C++ logging counts too). Operating-system faults are real where this machine
allows it (``chmod`` with the file-permission capabilities dropped, a 4 KiB tmpfs in a private mount
namespace) and injected otherwise (``open``/``mkdir`` raising ``PermissionError`` / ``EROFS`` /
``ENOSPC`` for one path only, which the issue allows for faults). Signals and a few cases run in a
subprocess (``python -m quantlab``) to prove that no traceback reaches a real terminal.
"""

from __future__ import annotations

import builtins
import errno
import fnmatch
import hashlib
import io
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hostile_models as hm
import numpy as np
import onnx
import pytest
from PIL import Image

from quantlab.cli import main

ROOT = Path(__file__).resolve().parent.parent
ERROR_LINE = re.compile(r"^quantlab(?: (?P<cmd>[a-z-]+)(?: [a-z-]+)?)?: error: ")
INTERRUPTED_LINE = re.compile(r"^quantlab(?: [a-z-]+)?: .*interrupted", re.IGNORECASE)
TEMP_NAME = re.compile(r"^\..+\.(?:tmp|old)$")


# ─────────────────────────────── the shared workspace ───────────────────────────────


CALIB_TOML = """\
role = "calibration"

[[source]]
kind = "npy"
path = "data"

[inputs]
input = "array"
"""

UNLABELLED_TOML = """\
role = "validation"

[[source]]
kind = "npz"
path = "val/val.npz"
batched = true

[inputs]
input = "input"
"""

VAL_TOML = UNLABELLED_TOML + """
[labels]
column = "label"
"""


EXPERIMENT_TOML = """\
name = "exp"
[model]
path = "model.onnx"
[data]
calibration = "calib.toml"
validation = "val.toml"
[calibrate]
methods = ["minmax"]
[candidates]
fp16 = false
int8 = ["minmax"]
[search]
enabled = false
"""


def _sample(seed: int, shape: tuple[int, ...] = (3, hm.SIZE, hm.SIZE)) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, shape).astype(np.float32)


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One valid model, its data sets, and earlier outputs of calibrate, build and compare (made once)."""
    root = tmp_path_factory.mktemp("hostile_assets")
    onnx.save(hm.small_conv_net(), root / "model.onnx")
    (root / "data").mkdir()
    for i in range(4):
        np.save(root / "data" / f"s{i}.npy", _sample(i))
    (root / "val").mkdir()
    np.savez(root / "val" / "val.npz", input=np.stack([_sample(10 + i) for i in range(6)]),
             label=np.arange(6, dtype=np.int64) % 4)
    (root / "calib.toml").write_text(CALIB_TOML)
    (root / "val.toml").write_text(VAL_TOML)
    (root / "unlabelled.toml").write_text(UNLABELLED_TOML)
    made = root / "made"
    steps = [
        ["calibrate", str(root / "model.onnx"), "--calib", str(root / "calib.toml"), "--method", "all",
         "--no-progress", "--out", str(made / "cal")],
        ["build", str(root / "model.onnx"), "--table", str(made / "cal" / "calib_entropy.json"),
         "--out", str(made / "build")],
        ["compare", str(root / "model.onnx"), str(made / "build"), "--data", str(root / "val.toml"),
         "--no-progress", "--bootstrap", "0", "--out", str(made / "cmp")],
        ["export", "triton", str(made / "build"), "--name", "m", "--repository", str(made / "repo")],
        ["run", str(root / "exp.toml"), "--quiet", "--reports-dir", str(made / "reports")],
    ]
    (root / "exp.toml").write_text(EXPERIMENT_TOML)
    for argv in steps:
        assert main(argv) == 0, argv
    return root


def make_workspace(t: Path, assets: Path) -> None:
    """The case folder: model.onnx, data/, val/, calib.toml, val.toml, unlabelled.toml, table.json,
    build/ (a `quantlab build` output), prev_cal/ and prev_cmp/ (earlier calibrate / compare outputs),
    repo/m/1 (an earlier `quantlab export triton`), shared/exp (a link to a `quantlab run` report that no case
    writes to), notes.txt (a user's file)."""
    for name in ("model.onnx", "calib.toml", "val.toml", "unlabelled.toml"):
        shutil.copy(assets / name, t / name)
    for name in ("data", "val"):
        shutil.copytree(assets / name, t / name)
    shutil.copy(assets / "made" / "cal" / "calib_entropy.json", t / "table.json")
    shutil.copytree(assets / "made" / "build", t / "build")
    shutil.copytree(assets / "made" / "cal", t / "prev_cal")
    shutil.copytree(assets / "made" / "cmp", t / "prev_cmp")
    shutil.copytree(assets / "made" / "repo", t / "repo")
    (t / "shared").symlink_to(assets / "made" / "reports", target_is_directory=True)
    (t / "notes.txt").write_text("my notes: do not delete\n")


# ─────────────────────────────── snapshots ───────────────────────────────


def snapshot(root: Path) -> dict[str, str]:
    """relative path -> content hash (files), 'dir' (folders) or the link target (symlinks)."""
    state: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in dirnames + filenames:
            path = Path(dirpath) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                state[rel] = "link:" + os.readlink(path)
            elif path.is_dir():
                state[rel] = "dir"
            elif path.is_file():
                state[rel] = hashlib.sha256(path.read_bytes()).hexdigest()
            else:
                state[rel] = "special"
    return state


def assert_nothing_else_changed(before: dict[str, str], after: dict[str, str], outputs: tuple[str, ...]) -> None:
    changed = sorted(k for k, v in before.items() if after.get(k) != v)
    assert not changed, f"pre-existing files changed or removed: {changed}"
    leftovers = sorted(k for k in after if any(TEMP_NAME.match(part) for part in Path(k).parts))
    assert not leftovers, f"temp files left behind: {leftovers}"
    new = sorted(k for k in after if k not in before and not any(fnmatch.fnmatch(k, p) for p in outputs))
    assert not new, f"files written although the command failed: {new}"


def assert_one_error_line(stderr: str, stdout: str, cmd: str | None, names: list[str], absent: list[str],
                          folder: Path | None = None) -> str:
    """The one error line; ``names`` are looked for with ``folder`` (the case folder) cut out of it, so a
    name is never found in the temporary path itself."""
    assert "Traceback" not in stderr, f"traceback on stderr:\n{stderr}"
    assert "Traceback" not in stdout, f"traceback on stdout:\n{stdout}"
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if ERROR_LINE.match(line)]
    assert len(errors) == 1, f"expected exactly one error line, got {len(errors)}; stderr:\n{stderr}"
    line = errors[0]
    assert ERROR_LINE.match(line)["cmd"] == cmd, f"error line is not from `quantlab {cmd}`: {line}"
    assert lines[-1] == line, f"the error message continues after its first line (one line only); stderr:\n{stderr}"
    bare = line.replace(str(folder), "<case>") if folder is not None else line
    for name in names:
        assert name.lower() in bare.lower(), f"error line does not name {name!r}: {line}"
    for wrong in absent:
        assert wrong.lower() not in line.lower(), f"error line gives advice that does not apply ({wrong!r}): {line}"
    return line


# ─────────────────────────────── fault injection (one path only) ───────────────────────────────


def _inside(path: object, folder: Path) -> bool:
    if not isinstance(path, (str, bytes, os.PathLike)):
        return False
    p = os.path.realpath(os.fsdecode(path))
    f = os.path.realpath(folder)
    return p == f or p.startswith(f + os.sep)


def _writes(mode: str) -> bool:
    return any(c in mode for c in "wax+")


def _oserror(code: int, path: object) -> OSError:
    cls = PermissionError if code in (errno.EACCES, errno.EPERM) else OSError
    return cls(code, os.strerror(code), os.fsdecode(path))


def deny_reading(target: Path, code: int = errno.EACCES) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Opening ``target`` (relative to the case folder) for reading raises PermissionError, as for a mode-000
    file of another user: stat still works, reading does not."""

    def install(t: Path, mp: pytest.MonkeyPatch) -> None:
        path = t / target
        real_open, real_os_open = builtins.open, os.open

        def guarded_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            if _inside(file, path) and not _writes(mode):
                raise _oserror(code, file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(file: object, flags: int, *args: object, **kwargs: object) -> int:
            if _inside(file, path) and not flags & (os.O_WRONLY | os.O_RDWR):
                raise _oserror(code, file)
            return real_os_open(file, flags, *args, **kwargs)

        mp.setattr(builtins, "open", guarded_open)
        mp.setattr(io, "open", guarded_open)
        mp.setattr(os, "open", guarded_os_open)

    return install


def deny_writing(folder: Path, code: int = errno.EROFS) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Nothing can be created, replaced or removed inside ``folder`` (relative to the case folder): a read-only
    file system (EROFS) or a folder of another user (EACCES). ``os.access(W_OK)`` says so too."""

    def install(t: Path, mp: pytest.MonkeyPatch) -> None:
        root = t / folder
        real = {name: getattr(os, name) for name in ("open", "mkdir", "replace", "rename", "unlink", "remove",
                                                     "rmdir", "access")}
        real_open = builtins.open

        def guarded_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            if _writes(mode) and _inside(file, root):
                raise _oserror(code, file)
            return real_open(file, mode, *args, **kwargs)

        def guarded_os_open(file: object, flags: int, *args: object, **kwargs: object) -> int:
            if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and _inside(file, root):
                raise _oserror(code, file)
            return real["open"](file, flags, *args, **kwargs)

        def guarded(name: str) -> Callable[..., object]:
            def call(*args: object, **kwargs: object) -> object:
                if any(_inside(a, root) for a in args[:2]):
                    raise _oserror(code, args[0])
                return real[name](*args, **kwargs)
            return call

        def access(path: object, mode: int, *args: object, **kwargs: object) -> bool:
            if mode & os.W_OK and _inside(path, root):
                return False
            return real["access"](path, mode, *args, **kwargs)

        mp.setattr(builtins, "open", guarded_open)
        mp.setattr(io, "open", guarded_open)
        mp.setattr(os, "open", guarded_os_open)
        for name in ("mkdir", "replace", "rename", "unlink", "remove", "rmdir"):
            mp.setattr(os, name, guarded(name))
        mp.setattr(os, "access", access)

    return install


class _FullFile:
    """A file opened for writing on a full disk: opening works, every write raises ENOSPC."""

    def __init__(self, handle: object, path: str) -> None:
        self._handle, self._path = handle, path

    def write(self, data: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def writelines(self, lines: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), self._path)

    def __enter__(self) -> _FullFile:  # noqa: PYI034 - Self needs Python 3.11
        return self

    def __exit__(self, *exc: object) -> None:
        self._handle.close()  # type: ignore[attr-defined]

    def __getattr__(self, name: str) -> object:
        return getattr(self._handle, name)


def disk_full(folder: Path) -> Callable[[Path, pytest.MonkeyPatch], None]:
    """Files and folders can be created inside ``folder`` but every write to a file there fails with ENOSPC."""

    def install(t: Path, mp: pytest.MonkeyPatch) -> None:
        root = t / folder
        real_open, real_os_write = builtins.open, os.write
        fds: set[int] = set()
        real_os_open = os.open

        def full_open(file: object, mode: str = "r", *args: object, **kwargs: object) -> object:
            handle = real_open(file, mode, *args, **kwargs)
            if _writes(mode) and _inside(file, root):
                return _FullFile(handle, os.fsdecode(file))  # type: ignore[arg-type]
            return handle

        def tracking_os_open(file: object, flags: int, *args: object, **kwargs: object) -> int:
            fd = real_os_open(file, flags, *args, **kwargs)
            if flags & (os.O_WRONLY | os.O_RDWR) and _inside(file, root):
                fds.add(fd)
            return fd

        def full_write(fd: int, data: bytes) -> int:
            if fd in fds and data:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real_os_write(fd, data)

        mp.setattr(builtins, "open", full_open)
        mp.setattr(io, "open", full_open)
        mp.setattr(os, "open", tracking_os_open)
        mp.setattr(os, "write", full_write)

    return install


# ─────────────────────────────── setup helpers ───────────────────────────────

Setup = Callable[[Path], None]


def write(rel: str, content: str | bytes) -> Setup:
    def setup(t: Path) -> None:
        path = t / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    return setup


def save_array(rel: str, array: np.ndarray) -> Setup:
    def setup(t: Path) -> None:
        (t / rel).parent.mkdir(parents=True, exist_ok=True)
        np.save(t / rel, array)
    return setup


def save_npz(rel: str, **arrays: np.ndarray) -> Setup:
    def setup(t: Path) -> None:
        (t / rel).parent.mkdir(parents=True, exist_ok=True)
        np.savez(t / rel, **arrays)
    return setup


def save_model(rel: str, build: Callable[[], onnx.ModelProto]) -> Setup:
    def setup(t: Path) -> None:
        (t / rel).parent.mkdir(parents=True, exist_ok=True)
        onnx.save(build(), t / rel)
    return setup


def truncated_model(rel: str) -> Setup:
    def setup(t: Path) -> None:
        data = (t / "model.onnx").read_bytes()
        (t / rel).write_bytes(data[: len(data) // 2])
    return setup


def mkdir(rel: str) -> Setup:
    return lambda t: (t / rel).mkdir(parents=True, exist_ok=True)


def fifo(rel: str) -> Setup:
    return lambda t: os.mkfifo(t / rel)


def images(folder: str, names: tuple[str, ...], size: int = 12) -> Setup:
    def setup(t: Path) -> None:
        (t / folder).mkdir(parents=True, exist_ok=True)
        for i, name in enumerate(names):
            Image.fromarray(np.full((size, size, 3), 40 * i, np.uint8)).save(t / folder / name)
    return setup


def _table_of_another_model(table: Path, target: Path) -> None:
    """``table`` as if calibrated on another model: other hash, and its tensors renamed."""
    import json

    doc = json.loads(table.read_text())
    doc["model_sha256"] = "0" * 64
    doc["tensors"] = {f"other_{name}": entry for name, entry in doc["tensors"].items()}
    target.write_text(json.dumps(doc))


def chain(*steps: Setup) -> Setup:
    def setup(t: Path) -> None:
        for step in steps:
            step(t)
    return setup


def npy_manifest(top: str = "", source: str = "", rest: str = "", path: str = '"data"') -> str:
    """The calibration manifest with extra top-level keys, source keys and trailing tables."""
    return (f'{top}\n[[source]]\nkind = "npy"\npath = {path}\n{source}\n'
            f'[inputs]\ninput = "array"\n{rest}')


def image_manifest(preprocess: str, rest: str = "") -> str:
    return ('[[source]]\nkind = "images"\npath = "photos"\n\n[inputs]\ninput = "image"\n\n'
            f'[preprocess]\n{preprocess}\n{rest}')


HOOKS = '''\
import numpy as np

def good(image):
    return np.zeros((3, 8, 8), np.float32)

def boom(image):
    raise ValueError("the hook exploded on purpose")

def wrong_shape(image):
    return np.zeros((5, 5), np.float32)

def nothing(image):
    return None
'''

METRICS = '''\
def boom(reference, candidate, label):
    raise RuntimeError("metric exploded on purpose")
'''


# ─────────────────────────────── the cases ───────────────────────────────


@dataclass(frozen=True)
class Case:
    """One hostile command line. ``argv``, ``names`` and ``absent`` are formatted with ``t`` = the case folder."""

    id: str
    argv: str
    code: int | tuple[int, ...]
    names: tuple[str, ...] = ()
    setup: Setup | None = None
    fault: Callable[[Path, pytest.MonkeyPatch], None] | None = None
    absent: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()
    refused_before_work: bool = False  # the model never ran: the refusal (bad threshold, unwritable --out) came first

    @property
    def command(self) -> str | None:
        word = self.argv.split()[0]
        return word if not word.startswith("-") and word in KNOWN_COMMANDS else None


KNOWN_COMMANDS = {"calibrate", "build", "perf", "compare", "search", "run", "report", "demo", "export", "sweep",
                  "coverage"}

CAL = "calibrate {t}/model.onnx --no-progress --out {t}/out --calib "
PERF = "perf --backend ort --iterations 1 --warmup 0 "
CMP = "compare {t}/model.onnx {t}/build --no-progress --bootstrap 0 --out {t}/out "
BUILD = "build {t}/model.onnx --table {t}/table.json --out {t}/out "
SEARCH = "search {t}/model.onnx --table {t}/table.json --data {t}/val.toml --out {t}/out "
EXPORT = "export triton {t}/build --name m --repository {t}/repo "

MODEL_CASES = [
    Case("model-not-onnx", PERF + "{t}/notes.onnx", 2, ("notes.onnx",), write("notes.onnx", "hello, I am text\n")),
    Case("model-truncated", CAL.replace("{t}/model.onnx", "{t}/half.onnx") + "{t}/calib.toml --method minmax", 2,
         ("half.onnx",), truncated_model("half.onnx")),
    Case("model-empty-file", BUILD.replace("{t}/model.onnx", "{t}/empty.onnx"), 2, ("empty.onnx",),
         write("empty.onnx", b"")),
    Case("model-is-a-folder", PERF + "{t}/folder.onnx", 2, ("folder.onnx",), mkdir("folder.onnx")),
    Case("model-missing", CMP.replace("{t}/model.onnx", "{t}/gone.onnx") + "--data {t}/val.toml", 2, ("gone.onnx",)),
    Case("model-path-under-a-file", PERF + "{t}/notes.txt/model.onnx", 2, ("notes.txt/model.onnx",)),
    Case("model-is-dev-null", PERF + "/dev/null", 2, ("/dev/null",)),
    Case("model-external-data-escapes-folder", CAL.replace("{t}/model.onnx", "{t}/m/ext.onnx") + "{t}/calib.toml", 2,
         ("ext.onnx", "w1", "../notes.txt"), save_model("m/ext.onnx", lambda: hm.external_data_net("../notes.txt"))),
    Case("model-external-data-absolute-path", PERF + "{t}/ext.onnx", 2, ("ext.onnx", "w1", "/etc/hostname"),
         save_model("ext.onnx", lambda: hm.external_data_net("/etc/hostname"))),
    Case("model-external-data-missing", PERF + "{t}/ext.onnx", 2, ("ext.onnx", "w1", "weights.bin"),
         save_model("ext.onnx", lambda: hm.external_data_net("weights.bin"))),
    Case("model-cycle", CAL.replace("{t}/model.onnx", "{t}/cycle.onnx") + "{t}/calib.toml", 2,
         ("cycle.onnx", "cycle_add"), save_model("cycle.onnx", hm.cyclic_net)),
    Case("model-duplicate-node-names-perf", PERF + "{t}/dup.onnx", 2, ("dup.onnx", "relu1"),
         save_model("dup.onnx", hm.duplicate_names_net)),
    Case("model-duplicate-node-names-calibrate", CAL.replace("{t}/model.onnx", "{t}/dup.onnx") + "{t}/calib.toml", 2,
         ("dup.onnx", "relu1"), save_model("dup.onnx", hm.duplicate_names_net)),
    Case("model-huge-dim-perf", PERF + "{t}/huge.onnx", 2, ("huge.onnx", "'input'", "bytes"),
         save_model("huge.onnx", hm.huge_dim_net)),
    Case("model-huge-fixed-batch-perf", PERF + "{t}/hugebatch.onnx", 2, ("hugebatch.onnx", "'input'", "bytes"),
         save_model("hugebatch.onnx", lambda: hm.huge_dim_net(10**12, axis=0))),
    Case("model-huge-dim-calibrate-no-crop-advice", CAL.replace("{t}/model.onnx", "{t}/huge.onnx") + "{t}/calib.toml",
         2, ("huge.onnx", "'input'"), save_model("huge.onnx", hm.huge_dim_net), absent=("center_crop",)),
    Case("model-custom-op-unknown-domain-perf", PERF + "{t}/custom.onnx", 2,
         ("Frobnicate", hm.CUSTOM_DOMAIN, "frobnicate"), save_model("custom.onnx", hm.custom_op_net)),
    Case("model-custom-op-unknown-domain-calibrate", CAL.replace("{t}/model.onnx", "{t}/custom.onnx") +
         "{t}/calib.toml", 2, ("Frobnicate", "frobnicate"), save_model("custom.onnx", hm.custom_op_net)),
    Case("model-unreadable-calibrate", CAL + "{t}/calib.toml", 3, ("model.onnx",),
         fault=deny_reading(Path("model.onnx")),
         absent=("re-export",)),
    Case("model-unreadable-build", BUILD, 3, ("model.onnx",), fault=deny_reading(Path("model.onnx"))),
    Case("model-batch-size-cannot-fit-perf", PERF + "{t}/model.onnx --batch-size 1000000000000", 2,
         ("'input'", "bytes")),
    Case("compare-candidate-not-onnx", "compare {t}/model.onnx {t}/notes.txt --no-progress --out {t}/out "
         "--data {t}/val.toml", 2, ("notes.txt",)),
    Case("compare-candidate-other-inputs", "compare {t}/model.onnx {t}/other.onnx --no-progress --out {t}/out "
         "--data {t}/val.toml", 2, ("other", "pixels"), save_model("other.onnx", hm.other_input_net)),
]

MANIFEST_CASES = [
    Case("manifest-unknown-top-level-key", CAL + "{t}/bad.toml", 2, ("bad.toml", "colour"),
         write("bad.toml", npy_manifest(top='colour = "blue"'))),
    Case("manifest-unknown-source-key", CAL + "{t}/bad.toml", 2, ("bad.toml", "pth"),
         write("bad.toml", npy_manifest(source='pth = "data"'))),
    Case("manifest-count-wrong-type", CAL + "{t}/bad.toml", 2, ("bad.toml", "count"),
         write("bad.toml", npy_manifest(top='count = "ten"'))),
    Case("manifest-count-negative", CAL + "{t}/bad.toml", 2, ("bad.toml", "count"),
         write("bad.toml", npy_manifest(top="count = -3"))),
    Case("manifest-count-more-than-available", CAL + "{t}/bad.toml", 2, ("bad.toml", "count"),
         write("bad.toml", npy_manifest(top="count = 1000"))),
    Case("manifest-role-unknown", CAL + "{t}/bad.toml", 2, ("bad.toml", "role"),
         write("bad.toml", npy_manifest(top='role = "training"'))),
    Case("manifest-toml-syntax", CAL + "{t}/bad.toml", 2, ("bad.toml", "line"),
         write("bad.toml", "[[source]\nkind = npy\n")),
    Case("manifest-not-utf8", CAL + "{t}/bad.toml", 2, ("bad.toml",), write("bad.toml", b"\xff\xfe\x00binary\x00")),
    Case("manifest-missing", CAL + "{t}/gone.toml", 2, ("gone.toml",)),
    Case("manifest-is-a-folder", CAL + "{t}/data", 2, ("data",)),
    Case("manifest-unreadable", CAL + "{t}/calib.toml", 3, ("calib.toml",), fault=deny_reading(Path("calib.toml"))),
    Case("manifest-no-source", CAL + "{t}/bad.toml", 2, ("bad.toml", "source"), write("bad.toml", 'name = "x"\n')),
    Case("manifest-unknown-kind", CAL + "{t}/bad.toml", 2, ("bad.toml", "csv"),
         write("bad.toml", '[[source]]\nkind = "csv"\npath = "data"\n')),
    Case("manifest-source-path-missing", CAL + "{t}/bad.toml", 2, ("bad.toml", "nowhere"),
         write("bad.toml", npy_manifest(path='"nowhere"'))),
    Case("manifest-listed-file-missing", CAL + "{t}/bad.toml", 2, ("bad.toml", "gone.npy"),
         write("bad.toml", npy_manifest(source='files = ["s0.npy", "gone.npy"]'))),
    Case("manifest-listed-file-escapes-folder", CAL + "{t}/bad.toml", 2, ("bad.toml", "../model.onnx"),
         write("bad.toml", npy_manifest(source='files = ["../model.onnx"]'))),
    Case("manifest-glob-matches-nothing", CAL + "{t}/bad.toml", 2, ("bad.toml", "*.png"),
         write("bad.toml", npy_manifest(source='pattern = "*.png"'))),
    Case("manifest-package-not-installed", CAL + "{t}/bad.toml", 2, ("bad.toml", "no_such_package_qx"),
         write("bad.toml", npy_manifest(source='package = "no_such_package_qx"'))),
    Case("manifest-inputs-unknown-model-input", CAL + "{t}/bad.toml", 2, ("'pixels'",),
         write("bad.toml", '[[source]]\nkind = "npy"\npath = "data"\n\n[inputs]\npixels = "array"\n')),
    Case("manifest-inputs-unknown-field", CAL + "{t}/bad.toml", 2, ("bad.toml", "nosuchfield"),
         write("bad.toml", '[[source]]\nkind = "npy"\npath = "data"\n\n[inputs]\ninput = "nosuchfield"\n')),
    Case("manifest-image-key-on-npy-source", CAL + "{t}/bad.toml", 2, ("bad.toml", "resize"),
         write("bad.toml", npy_manifest(rest="\n[preprocess]\nresize = 10\n"))),
    Case("manifest-dtype-unknown", CAL + "{t}/bad.toml", 2, ("bad.toml", "float8"),
         write("bad.toml", npy_manifest(rest='\n[preprocess]\ndtype = "float8"\n'))),
    Case("manifest-labels-column-missing", CMP + "--data {t}/bad.toml", 2, ("bad.toml", "lbl"),
         write("bad.toml", VAL_TOML.replace('column = "label"', 'column = "lbl"'))),
    Case("data-wrong-rank", CAL + "{t}/bad.toml", 2, ("'input'", "rank"),
         chain(save_array("flat/a.npy", _sample(1, (8, 8))), write("bad.toml", npy_manifest(path='"flat"')))),
    Case("data-wrong-shape-npz-no-crop-advice", CAL + "{t}/bad.toml", 2, ("'input'", "16"),
         chain(save_npz("big/a.npz", input=_sample(1, (3, 16, 16))),
               write("bad.toml", '[[source]]\nkind = "npz"\npath = "big"\n')), absent=("center_crop",)),
    Case("data-wrong-dtype", CAL + "{t}/bad.toml", 2, ("'input'", "int64"),
         chain(save_array("ints/a.npy", np.ones((3, 8, 8), np.int64)), write("bad.toml", npy_manifest(path='"ints"')))),
    Case("data-strings", CAL + "{t}/bad.toml", 2, ("'input'",),
         chain(save_array("txt/a.npy", np.full((3, 8, 8), "x")), write("bad.toml", npy_manifest(path='"txt"')))),
    Case("data-nan", CAL + "{t}/bad.toml", 2, ("'input'", "nan", "a.npy"),
         chain(save_array("nan/a.npy", np.full((3, 8, 8), np.nan, np.float32)),
               write("bad.toml", npy_manifest(path='"nan"')))),
    Case("data-inf", CMP + "--data {t}/bad.toml", 2, ("'input'", "inf", "a.npy"),
         chain(save_array("inf/a.npy", np.full((3, 8, 8), np.inf, np.float32)),
               write("bad.toml", npy_manifest(top='role = "validation"', path='"inf"')))),
    Case("data-npy-is-text", CAL + "{t}/bad.toml", 2, ("a.npy",),
         chain(write("txtnpy/a.npy", "this is not numpy\n"), write("bad.toml", npy_manifest(path='"txtnpy"'))),
         absent=("contains pickled",)),
    Case("data-npz-truncated", CAL + "{t}/bad.toml", 2, ("a.npz",),
         chain(write("cut/a.npz", b"PK\x03\x04truncated"),
               write("bad.toml", '[[source]]\nkind = "npz"\npath = "cut"\n'))),
    Case("data-npz-unreadable", CMP + "--data {t}/val.toml", 3, ("val.npz",), fault=deny_reading(Path("val/val.npz")),
         absent=("re-save", "numpy.save")),
    Case("data-image-corrupt", CAL + "{t}/bad.toml", 2, ("broken.png",),
         chain(images("photos", ("a.png",)), write("photos/broken.png", b"\x89PNG\r\n\x1a\nnot really"),
               write("bad.toml", image_manifest("resize = 8\ncenter_crop = 8")))),
    Case("data-image-smaller-than-crop", CAL + "{t}/bad.toml", 2, ("a.png", "center_crop"),
         chain(images("photos", ("a.png",), size=4), write("bad.toml", image_manifest("center_crop = 8")))),
    Case("data-labels-regex-no-match", CMP + "--data {t}/bad.toml", 2, ("cat.png",),
         chain(images("photos", ("cat.png",)),
               write("bad.toml", 'role = "validation"\n' + image_manifest("resize = 8\ncenter_crop = 8",
                                                                          "[labels]\nregex = '_(\\d+)\\.png$'\n")))),
    Case("hook-module-missing", CAL + "{t}/bad.toml", 2, ("no_such_hook_module",),
         chain(images("photos", ("a.png",)), write("bad.toml", image_manifest('hook = "no_such_hook_module:fn"')))),
    Case("hook-function-missing", CAL + "{t}/bad.toml", 2, ("hooks", "absent_fn"),
         chain(images("photos", ("a.png",)), write("hooks.py", HOOKS),
               write("bad.toml", image_manifest('hook = "hooks:absent_fn"')))),
    Case("hook-import-raises", CAL + "{t}/bad.toml", 2, ("brokenhook",),
         chain(images("photos", ("a.png",)), write("brokenhook.py", "raise ImportError('half installed')\n"),
               write("bad.toml", image_manifest('hook = "brokenhook:fn"')))),
    Case("hook-raises", CAL + "{t}/bad.toml", 2, ("boom", "exploded"),
         chain(images("photos", ("a.png",)), write("hooks.py", HOOKS),
               write("bad.toml", image_manifest('hook = "hooks:boom"')))),
    Case("hook-wrong-shape", CAL + "{t}/bad.toml", 2, ("'input'",),
         chain(images("photos", ("a.png",)), write("hooks.py", HOOKS),
               write("bad.toml", image_manifest('hook = "hooks:wrong_shape"')))),
    Case("hook-returns-none", CAL + "{t}/bad.toml", 2, ("nothing",),
         chain(images("photos", ("a.png",)), write("hooks.py", HOOKS),
               write("bad.toml", image_manifest('hook = "hooks:nothing"')))),
    Case("hook-not-module-function", CAL + "{t}/bad.toml", 2, ("bad.toml", "hook"),
         chain(images("photos", ("a.png",)), write("bad.toml", image_manifest('hook = "justaname"')))),
    Case("compare-metric-module-missing", CMP + "--data {t}/val.toml --metric no_such_metric_mod:fn", 2,
         ("no_such_metric_mod",)),
    Case("compare-metric-raises", CMP + "--data {t}/val.toml --metric {t}/metrics.py:boom", 2, ("boom", "exploded"),
         write("metrics.py", METRICS)),
]

FLAG_CASES = [
    Case("flag-unknown-command", "frobnicate {t}/model.onnx", 2, ("frobnicate",)),
    Case("flag-unknown-option", CAL + "{t}/calib.toml --colour blue", 2, ("--colour",)),
    Case("flag-batch-size-zero", CAL + "{t}/calib.toml --batch-size 0", 2, ("--batch-size",)),
    Case("flag-batch-size-negative", PERF + "{t}/model.onnx --batch-size -4", 2, ("--batch-size",)),
    Case("flag-batch-size-not-a-number", CMP + "--data {t}/val.toml --batch-size ten", 2, ("--batch-size", "ten")),
    Case("flag-iterations-float", PERF + "{t}/model.onnx --iterations 1.5", 2, ("--iterations",)),
    Case("flag-percentile-out-of-range", CAL + "{t}/calib.toml --percentile 150", 2, ("--percentile",)),
    Case("flag-confidence-one", CMP + "--data {t}/val.toml --confidence 1", 2, ("--confidence",)),
    Case("flag-dim-garbage", PERF + "{t}/model.onnx --dim N=abc", 2, ("--dim",)),
    Case("flag-time-budget-zero", SEARCH + "--threshold cosine>=0.5 --time-budget 0", 2, ("--time-budget",)),
    Case("flag-unknown-method", CAL + "{t}/calib.toml --method kmeans", 2, ("--method", "kmeans")),
    Case("flag-unknown-backend", PERF.replace("--backend ort", "--backend cuda") + "{t}/model.onnx", 2,
         ("--backend", "cuda")),
    Case("flag-backend-not-installed", PERF.replace("--backend ort", "--backend tensorrt") + "{t}/model.onnx", 3,
         ("tensorrt",)),
    Case("flag-table-and-trt-cache", BUILD + "--trt-cache {t}/table.json", 2, ("--trt-cache",)),
    Case("flag-plan-and-precision-disagree", BUILD + "--plan {t}/build/plan.json --precision fp16", 2,
         ("--plan", "--precision")),
    Case("flag-mixed-without-plan", BUILD + "--precision mixed", 2, ("--plan",)),
    Case("flag-labels-and-no-labels", CMP + "--data {t}/val.toml --labels --no-labels", 2, ("--no-labels",)),
    Case("flag-fp16-simulation-with-tensorrt", BUILD + "--backend tensorrt --fp16-simulation", 2,
         ("--fp16-simulation",)),
    Case("flag-search-calib-and-table", SEARCH + "--threshold cosine>=0.5 --calib {t}/calib.toml", 2, ("--calib",)),
    Case("build-table-not-json", BUILD.replace("{t}/table.json", "{t}/notes.txt"), 2, ("notes.txt",)),
    Case("build-table-for-another-model", BUILD.replace("{t}/table.json", "{t}/other.json"), 2, ("other.json",),
         lambda t: _table_of_another_model(t / "table.json", t / "other.json")),
    Case("build-trt-cache-garbage", "build {t}/model.onnx --trt-cache {t}/notes.txt --out {t}/out", 2, ("notes.txt",)),
    Case("build-plan-unknown-node", BUILD + "--plan {t}/plan.json", 2, ("plan.json", "no_such_node"),
         write("plan.json", '{"default": "int8", "rules": [{"node": "no_such_node", "precision": "fp16"}]}')),
    Case("run-experiment-missing", "run {t}/gone.toml --reports-dir {t}/reports", 2, ("gone.toml",)),
    Case("run-experiment-unknown-key", "run {t}/exp.toml --reports-dir {t}/reports", 2, ("exp.toml", "colour"),
         write("exp.toml", 'colour = "blue"\n[model]\npath = "model.onnx"\n[data]\ncalibration = "calib.toml"\n'
                           'validation = "val.toml"\n')),
    Case("run-experiment-model-not-onnx", "run {t}/exp.toml --reports-dir {t}/reports --quiet", 2, ("notes.txt",),
         write("exp.toml", '[model]\npath = "notes.txt"\n[data]\ncalibration = "calib.toml"\n'
                           'validation = "val.toml"\n'),
         outputs=("reports", "reports/*")),
    Case("run-report-folder-is-a-users-site", "run {t}/exp.toml --quiet --reports-dir {t}/site", 2, ("site/exp",),
         chain(write("exp.toml", '[model]\npath = "model.onnx"\n[data]\ncalibration = "calib.toml"\n'
                                 'validation = "val.toml"\n[search]\nenabled = false\n'),
               write("site/exp/index.html", "<h1>my own page</h1>\n"), write("site/exp/plots/logo.png", b"\x89PNG"))),
    Case("report-compare-out-holds-users-page", "report --compare {t}/shared/exp {t}/shared/exp --out {t}/site", 2,
         ("site",), write("site/index.html", "<h1>my own page</h1>\n")),
    Case("report-compare-out-read-only", "report --compare {t}/shared/exp {t}/shared/exp --out {t}/ro/cmp", 3,
         ("ro/cmp",), mkdir("ro"), deny_writing(Path("ro"))),
    Case("report-compare-out-disk-full", "report --compare {t}/shared/exp {t}/shared/exp --out {t}/full/cmp", 3,
         ("full/cmp",), mkdir("full"), disk_full(Path("full"))),
    Case("report-rerender-disk-full", "report {t}/myreport", 3, ("myreport",),
         lambda t: shutil.copytree(t / "shared" / "exp", t / "myreport"), disk_full(Path("myreport"))),
    Case("report-missing-folder", "report {t}/no_such_report", 2, ("no_such_report",),
         absent=("report_inputs.json here",)),
]

THRESHOLD_CASES = [
    Case("fail-if-empty", CMP + "--data {t}/val.toml --fail-if ''", 2, ("--fail-if",)),
    Case("fail-if-blank", CMP + "--data {t}/val.toml --fail-if '   '", 2, ("--fail-if",)),
    Case("fail-if-garbage", CMP + "--data {t}/val.toml --fail-if 'cosine>>1'", 2, ("cosine>>1",)),
    Case("fail-if-or-is-not-supported", CMP + "--data {t}/val.toml --fail-if 'cosine<0.9 or sqnr_db<3'", 2, ("or",)),
    Case("fail-if-unknown-metric", CMP + "--data {t}/val.toml --fail-if 'frobnicity<1'", 2, ("frobnicity",)),
    Case("fail-if-label-metric-without-labels", CMP + "--data {t}/unlabelled.toml --fail-if 'top1_drop>0.5'", 2,
         ("top1_drop", "labels")),
    Case("fail-if-label-metric-with-no-labels-flag", CMP + "--data {t}/val.toml --no-labels --fail-if 'top1_drop>0.5'",
         2, ("top1_drop",)),
    Case("threshold-empty", SEARCH + "--threshold ''", 2, ("threshold",),
         refused_before_work=True),
    Case("threshold-no-operator", SEARCH + "--threshold cosine", 2, ("cosine",),
         refused_before_work=True),
    Case("threshold-unknown-metric", SEARCH + "--threshold 'frobnicity>=1'", 2, ("frobnicity",),
         refused_before_work=True),
    Case("threshold-label-metric-without-labels", SEARCH.replace("val.toml", "unlabelled.toml") +
         "--threshold 'top1_drop<=0.5'", 2, ("top1_drop", "labels"),
         refused_before_work=True),
]

OUTPUT_CASES = [
    Case("calibrate-out-is-a-file", CAL.replace("{t}/out", "{t}/notes.txt") + "{t}/calib.toml", 2, ("notes.txt",)),
    Case("calibrate-out-holds-user-notes", CAL.replace("{t}/out", "{t}/prev_cal") + "{t}/calib.toml", 2,
         ("prev_cal", "notes.txt"), write("prev_cal/notes.txt", "results of last week, keep\n")),
    Case("compare-out-holds-user-notes", CMP.replace("{t}/out", "{t}/prev_cmp") + "--data {t}/val.toml", 2,
         ("prev_cmp", "notes.txt"), write("prev_cmp/notes.txt", "results of last week, keep\n")),
    Case("build-out-holds-user-notes", BUILD.replace("{t}/out", "{t}/build"), 2, ("build", "notes.txt"),
         write("build/notes.txt", "keep\n")),
    Case("compare-out-is-the-candidate", CMP.replace("{t}/out", "{t}/build") + "--data {t}/val.toml", 2, ("build",)),
    Case("calibrate-out-under-a-file", CAL.replace("{t}/out", "{t}/notes.txt/out") + "{t}/calib.toml", 2,
         ("notes.txt/out",)),
    Case("calibrate-out-read-only", CAL.replace("{t}/out", "{t}/ro/out") + "{t}/calib.toml", 3, ("ro/out",),
         mkdir("ro"), deny_writing(Path("ro")),
         refused_before_work=True),
    Case("calibrate-out-permission-denied", CAL.replace("{t}/out", "{t}/ro/out") + "{t}/calib.toml", 3, ("ro/out",),
         mkdir("ro"), deny_writing(Path("ro"), errno.EACCES),
         refused_before_work=True),
    Case("build-out-read-only", BUILD.replace("{t}/out", "{t}/ro/out"), 3, ("ro/out",), mkdir("ro"),
         deny_writing(Path("ro"))),
    Case("compare-out-read-only", CMP.replace("{t}/out", "{t}/ro/out") + "--data {t}/val.toml", 3, ("ro/out",),
         mkdir("ro"), deny_writing(Path("ro")),
         refused_before_work=True),
    Case("perf-json-read-only", PERF + "{t}/model.onnx --json {t}/ro/perf.json", 3, ("perf.json",), mkdir("ro"),
         deny_writing(Path("ro"))),
    Case("search-out-read-only", SEARCH.replace("{t}/out", "{t}/ro/out") + "--threshold cosine>=0.5", 3, ("ro/out",),
         mkdir("ro"), deny_writing(Path("ro")),
         refused_before_work=True,
         outputs=("ro/out", "ro/out/work", "ro/out/work/*")),
    Case("run-reports-dir-read-only", "run {t}/exp.toml --quiet --reports-dir {t}/ro", 3, ("ro",),
         chain(mkdir("ro"), write("exp.toml", '[model]\npath = "model.onnx"\n[data]\ncalibration = "calib.toml"\n'
                                              'validation = "val.toml"\n')), deny_writing(Path("ro")),
         refused_before_work=True),
    Case("calibrate-disk-full", CAL.replace("{t}/out", "{t}/full/out") + "{t}/calib.toml", 3, ("full/out",),
         mkdir("full"), disk_full(Path("full"))),
    Case("calibrate-disk-full-replacing-earlier-run", CAL.replace("{t}/out", "{t}/prev_cal") + "{t}/calib.toml", 3,
         ("prev_cal",), fault=disk_full(Path("."))),
    Case("build-disk-full", BUILD.replace("{t}/out", "{t}/full/out"), 3, ("full/out",), mkdir("full"),
         disk_full(Path("full"))),
    Case("compare-disk-full", CMP.replace("{t}/out", "{t}/full/out") + "--data {t}/val.toml", 3, ("full/out",),
         mkdir("full"), disk_full(Path("full"))),
    Case("perf-json-disk-full", PERF + "{t}/model.onnx --json {t}/full/perf.json", 3, ("perf.json",), mkdir("full"),
         disk_full(Path("full"))),
    Case("search-disk-full", SEARCH.replace("{t}/out", "{t}/full/out") + "--threshold cosine>=0.5", 3, ("full/out",),
         mkdir("full"), disk_full(Path("full")),
         outputs=("full/out", "full/out/work", "full/out/work/*")),
]

EXPORT_CASES = [
    Case("export-unknown-target", "export onnx {t}/build --name m --repository {t}/repo", 2, ("onnx",)),
    Case("export-source-missing", EXPORT.replace("{t}/build", "{t}/gone"), 2, ("gone",)),
    Case("export-source-not-a-build", EXPORT.replace("{t}/build", "{t}/data"), 2, ("data",)),
    Case("export-name-escapes-repository", EXPORT.replace("--name m", "--name ../escape"), 2, ("--name", "../escape")),
    Case("export-max-batch-size-negative", EXPORT + "--max-batch-size -3", 2, ("--max-batch-size",)),
    Case("export-instances-zero", EXPORT + "--instances 0", 2, ("--instances",)),
    Case("export-version-negative", EXPORT + "--version -1", 2, ("--version",)),
    Case("export-repository-is-a-file", EXPORT.replace("{t}/repo", "{t}/notes.txt"), 2, ("notes.txt",)),
    Case("export-repository-read-only", EXPORT.replace("{t}/repo", "{t}/ro/repo"), 3, ("ro/repo",), mkdir("ro"),
         deny_writing(Path("ro"))),
    Case("export-repository-disk-full", EXPORT.replace("{t}/repo", "{t}/full/repo"), 3, ("full/repo",), mkdir("full"),
         disk_full(Path("full"))),
]

SWEEP_TOML = """\
name = "hostile"
[data]
calibration = "calib.toml"
validation = "val.toml"
[[model]]
path = "model.onnx"
label = "m"
[grid]
methods = ["minmax"]
fp16 = false
search = false
"""

SWEEP_CASES = [
    Case("sweep-file-missing", "sweep {t}/gone.toml --reports-dir {t}/reports", 2, ("gone.toml",)),
    Case("sweep-unknown-key", "sweep {t}/sweep.toml --reports-dir {t}/reports", 2, ("sweep.toml", "colour"),
         write("sweep.toml", 'colour = "blue"\n' + SWEEP_TOML)),
    Case("sweep-unknown-method", "sweep {t}/sweep.toml --reports-dir {t}/reports", 2, ("sweep.toml", "kmeans"),
         write("sweep.toml", SWEEP_TOML.replace('["minmax"]', '["kmeans"]'))),
    Case("sweep-processes-zero", "sweep {t}/sweep.toml --processes 0 --reports-dir {t}/reports", 2, ("--processes",),
         write("sweep.toml", SWEEP_TOML)),
    Case("sweep-report-folder-is-a-users-site", "sweep {t}/sweep.toml --quiet --reports-dir {t}/site", 2,
         ("site/hostile",), chain(write("sweep.toml", SWEEP_TOML), write("site/hostile/index.html", "<h1>mine</h1>\n"),
                                  write("site/hostile/plots/logo.png", b"\x89PNG"))),
    Case("sweep-reports-dir-read-only", "sweep {t}/sweep.toml --quiet --reports-dir {t}/ro", 3, ("ro",),
         chain(mkdir("ro"), write("sweep.toml", SWEEP_TOML)), deny_writing(Path("ro")), refused_before_work=True),
]

CASES = (MODEL_CASES + MANIFEST_CASES + FLAG_CASES + THRESHOLD_CASES + OUTPUT_CASES + EXPORT_CASES
         + SWEEP_CASES)
assert len({c.id for c in CASES}) == len(CASES), "case ids must be unique"


def _format(text: str, t: Path) -> str:
    return text.replace("{t}", str(t))


def count_model_runs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at every ONNX Runtime inference (a spy: the real ``run`` still runs)."""
    import onnxruntime

    calls: list[int] = []
    real_run = onnxruntime.InferenceSession.run

    def counting_run(self: object, *args: object, **kwargs: object) -> object:
        calls.append(1)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", counting_run)
    return calls


def run_in_process(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """``quantlab.cli.main(argv)`` as ``python -m quantlab`` would exit: SystemExit gives the code, an escaping
    exception is a traceback and exit 1 (what the interpreter would print and return)."""
    capfd.readouterr()
    trace = ""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - the point: nothing may escape the entry point
        trace = traceback.format_exc()
        code = 1
    out, err = capfd.readouterr()
    return code, out, err + trace


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_cli(case: Case, assets: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str],
                     monkeypatch: pytest.MonkeyPatch) -> None:
    t = tmp_path / "case"
    t.mkdir()
    make_workspace(t, assets)
    if case.setup is not None:
        case.setup(t)
    monkeypatch.chdir(t)
    if "--backend tensorrt " in case.argv and case.code == 3 and _installed("tensorrt"):
        pytest.skip("TensorRT is installed here; the missing-backend case needs a machine without it")
    before = snapshot(t)
    argv = shlex.split(_format(case.argv, t))
    model_runs = count_model_runs(monkeypatch) if case.refused_before_work else []
    if case.fault is not None:
        with monkeypatch.context() as mp:
            case.fault(t, mp)
            code, out, err = run_in_process(argv, capfd)
    else:
        code, out, err = run_in_process(argv, capfd)
    after = snapshot(t)
    expected = case.code if isinstance(case.code, tuple) else (case.code,)
    assert code in expected, f"exit code {code}, expected {case.code}; stderr:\n{err}"
    assert_one_error_line(err, out, case.command, [_format(n, t) for n in case.names],
                          [_format(a, t) for a in case.absent], folder=t)
    assert not model_runs, f"the model ran {len(model_runs)} time(s) before the command refused (check, then work)"
    assert_nothing_else_changed(before, after, case.outputs)


def _verdict_or_warning(code: int, out: str, err: str, cmd: str, name: str, folder: Path) -> None:
    """Either a refusal (exit 2, one error line naming ``name``) or success with a warning line naming it."""
    assert "Traceback" not in out + err, err
    if code == 0:
        lines = [line for line in (out + err).splitlines() if "warning" in line.lower() and name in line]
        assert lines, f"exit 0 without a warning naming {name!r}; stdout:\n{out}\nstderr:\n{err}"
    else:
        assert code == 2, f"exit code {code}, expected 0 (with a warning) or 2; stderr:\n{err}"
        assert_one_error_line(err, out, cmd, [name], [], folder=folder)


def test_nothing_to_calibrate_is_said_plainly(assets: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A model with no float activation tensor: a clear error or warning naming the model, never a raw
    pandas ``Empty DataFrame``."""
    t = tmp_path / "case"
    t.mkdir()
    make_workspace(t, assets)
    chain(save_model("ints.onnx", hm.integer_only_net), save_array("ints/a.npy", np.arange(4, dtype=np.int64)),
          write("ints.toml", npy_manifest(path='"ints"')))(t)
    before = snapshot(t)
    code, out, err = run_in_process(["calibrate", str(t / "ints.onnx"), "--calib", str(t / "ints.toml"),
                                     "--no-progress", "--out", str(t / "out")], capfd)
    assert "Empty DataFrame" not in out + err, out
    _verdict_or_warning(code, out, err, "calibrate", "ints.onnx", t)
    assert_nothing_else_changed(before, snapshot(t), ("out", "out/*") if code == 0 else ())


@pytest.mark.parametrize("amax", [0.0, 1e-45], ids=["amax-zero", "amax-denormal"])
def test_degenerate_range_is_named(amax: float, assets: Path, tmp_path: Path,
                                   capfd: pytest.CaptureFixture[str]) -> None:
    """A table whose range for ``relu1`` is 0 or 1e-45 (scale 1.0 today, silently): an error or a warning
    naming the tensor."""
    import json

    t = tmp_path / "case"
    t.mkdir()
    make_workspace(t, assets)
    doc = json.loads((t / "table.json").read_text())
    doc["tensors"]["relu1"].update(amax=amax, max=amax, scale=amax / 127)
    (t / "tiny.json").write_text(json.dumps(doc))
    before = snapshot(t)
    with warnings.catch_warnings(record=True) as caught:  # under pytest a Python warning does not reach stderr
        warnings.simplefilter("always")
        code, out, err = run_in_process(["build", str(t / "model.onnx"), "--table", str(t / "tiny.json"),
                                         "--out", str(t / "out")], capfd)
    err += "".join(f"{w.category.__name__}: {w.message}\n" for w in caught)
    _verdict_or_warning(code, out, err, "build", "relu1", t)
    assert_nothing_else_changed(before, snapshot(t), ("out", "out/*") if code == 0 else ())


def _dead_pid() -> int:
    """The id of a process that has just exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_later_run_sweeps_stale_temp_entries_it_owns(assets: Path, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str]) -> None:
    """Temp entries a killed run left (``.NAME.<pid>.<token>.tmp`` / ``.old`` of a dead process) are removed by
    the next run writing there; the user's own dot-files that merely end in ``.tmp`` are not."""
    t = tmp_path / "case"
    t.mkdir()
    make_workspace(t, assets)
    pid = _dead_pid()
    stale_dir = t / f".prev_cal.{pid}.abcd1234.tmp"
    stale_dir.mkdir(mode=0o700)
    (stale_dir / "calib_entropy.json").write_text("{}")
    (t / f".prev_cal.{pid}.efgh5678.old").mkdir()
    (t / f".notes.txt.{pid}.ijkl9012.tmp").write_text("half")
    (t / ".my-editor-backup.tmp").write_text("the user's, not quantlab's")
    before = snapshot(t)
    code, _, err = run_in_process(["calibrate", str(t / "model.onnx"), "--calib", str(t / "calib.toml"),
                                   "--no-progress", "--out", str(t / "prev_cal")], capfd)
    assert code == 0, err
    after = snapshot(t)
    left = sorted(k for k in after if str(pid) in k)
    assert not left, f"stale temp entries of dead process {pid} were not swept: {left}"
    assert after.get(".my-editor-backup.tmp") == before[".my-editor-backup.tmp"], "a user's file was removed"
    kept = {k: v for k, v in before.items() if not k.startswith(("prev_cal", f".prev_cal.{pid}", f".notes.txt.{pid}"))}
    assert {k: after.get(k) for k in kept} == kept, "files the run does not own changed"


KEEP_CASES = [
    ("export-version-folder-holds-user-notes", EXPORT + "--version 1", "repo/m/1/notes.txt"),
    ("export-warmup-folder-holds-user-file", EXPORT, "repo/m/warmup/my_request.bin"),
]


@pytest.mark.parametrize(("argv", "users_file"), [c[1:] for c in KEEP_CASES], ids=[c[0] for c in KEEP_CASES])
def test_a_users_file_in_the_output_is_kept_or_the_command_refuses(
        argv: str, users_file: str, assets: Path, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """A file the user put inside an output folder: the command either leaves it alone (exit 0) or refuses
    (exit 2, naming it, nothing changed); it never deletes it."""
    t = tmp_path / "case"
    t.mkdir()
    make_workspace(t, assets)
    write(users_file, "mine, not quantlab's\n")(t)
    before = snapshot(t)
    args = shlex.split(_format(argv, t))
    code, out, err = run_in_process(args, capfd)
    after = snapshot(t)
    assert after.get(users_file) == before[users_file], f"the user's {users_file} was removed or changed"
    if code != 0:
        assert code == 2, f"exit code {code}, expected 0 (file kept) or 2 (refused); stderr:\n{err}"
        assert_one_error_line(err, out, args[0], [Path(users_file).name], [], folder=t)
        assert_nothing_else_changed(before, after, ())


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def test_there_are_at_least_60_hostile_cases() -> None:
    assert len(CASES) + len(SUBPROCESS_CASES) + len(SIGNAL_CASES) + len(KEEP_CASES) >= 60


# ─────────────────────────────── a real terminal: subprocess ───────────────────────────────


def _drop_file_capabilities() -> list[str]:
    """As root, a command prefix that drops the capabilities that bypass file permissions (so chmod bites)."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot make a file unreadable for this process")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def _cli(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "quantlab", *argv]


def _env() -> dict[str, str]:
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("PYTHONPATH", None)
    return env


@dataclass(frozen=True)
class SubCase:
    """A case run as ``python -m quantlab``; ``real`` makes the fault real: ``chmod-model`` (mode 000, file
    capabilities dropped), ``read-only-out`` (out's parent mode 555, same), ``tmpfs-out`` (a 4 KiB tmpfs
    mounted on out's parent in a private mount namespace)."""

    id: str
    argv: str
    code: int
    names: tuple[str, ...]
    setup: Setup | None = None
    real: str = ""
    timeout: float = 120


SUBPROCESS_CASES = [
    SubCase("terminal-model-not-onnx", PERF + "{t}/notes.onnx", 2, ("notes.onnx",),
            write("notes.onnx", "hello, I am text\n")),
    SubCase("terminal-data-nan", CAL + "{t}/bad.toml", 2, ("'input'", "nan"),
            chain(save_array("nan/a.npy", np.full((3, 8, 8), np.nan, np.float32)),
                  write("bad.toml", npy_manifest(path='"nan"')))),
    SubCase("terminal-fail-if-empty", CMP + "--data {t}/val.toml --fail-if ''", 2, ("--fail-if",)),
    SubCase("terminal-fifo-model-does-not-hang", PERF + "{t}/pipe.onnx", 2, ("pipe.onnx",), fifo("pipe.onnx"),
            timeout=15),
    SubCase("real-model-mode-000", CAL + "{t}/calib.toml", 3, ("model.onnx",), real="chmod-model"),
    SubCase("real-out-parent-read-only", CAL.replace("{t}/out", "{t}/ro/out") + "{t}/calib.toml", 3, ("ro/out",),
            mkdir("ro"), real="read-only-out"),
    SubCase("real-disk-full-tmpfs", CAL.replace("{t}/out", "{t}/small/out") + "{t}/calib.toml", 3, ("small/out",),
            mkdir("small"), real="tmpfs-out"),
]


@dataclass
class Launched:
    t: Path
    argv: list[str]
    before: dict[str, str]
    proc: subprocess.Popen[str] | None
    started: float
    skip: str = ""
    marker: Path | None = None


def _command(case: SubCase, t: Path, argv: list[str]) -> tuple[list[str], str]:
    """The command line for ``case`` (and a reason to skip when this machine cannot make the fault real)."""
    cmd = _cli(argv)
    if case.real in ("chmod-model", "read-only-out"):
        if os.geteuid() == 0 and shutil.which("setpriv") is None:
            return cmd, "running as root without setpriv: chmod does not stop root"
        if case.real == "chmod-model":
            (t / "model.onnx").chmod(0)
        else:
            (t / "ro").chmod(0o555)
        return _drop_file_capabilities() + cmd, ""
    if case.real == "tmpfs-out":
        if os.geteuid() != 0 or shutil.which("unshare") is None:
            return cmd, "a private tmpfs needs root and unshare"
        # the mount vanishes with the process, so the shell lists what the command left in it
        small = shlex.quote(str(t / "small"))
        script = (f"mount -t tmpfs -o size=4k tmpfs {small} || exit 97; {shlex.join(cmd)}; rc=$?; "
                  f"echo LEFT: $(ls -A {small}) >&2; exit $rc")
        return ["unshare", "-m", "sh", "-c", script], ""
    return cmd, ""


@pytest.fixture(scope="module")
def launched(assets: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Launched]:
    """Every SUBPROCESS_CASES and SIGNAL_CASES command started at once (each is mostly interpreter start-up and
    waiting); the tests collect them."""
    runs: dict[str, Launched] = {}
    for sig in SIGNAL_CASES:
        t = tmp_path_factory.mktemp(sig.id) / "case"
        t.mkdir()
        make_workspace(t, assets)
        marker = t.parent / "paused.marker"
        argv = ["calibrate", str(t / "model.onnx"), "--calib", str(t / "calib.toml"), "--no-progress",
                "--out", str(t / "prev_cal")]
        before = snapshot(t)
        proc = subprocess.Popen([sys.executable, "-c", PAUSING_QUANTLAB, str(marker), sig.when, *argv], cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        runs[sig.id] = Launched(t, argv, before, proc, time.monotonic(), marker=marker)
    for case in SUBPROCESS_CASES:
        t = tmp_path_factory.mktemp(case.id) / "case"
        t.mkdir()
        make_workspace(t, assets)
        if case.setup is not None:
            case.setup(t)
        argv = shlex.split(_format(case.argv, t))
        cmd, skip = _command(case, t, argv)
        before = snapshot(t)
        proc = None if skip else subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True, env=_env())
        runs[case.id] = Launched(t, argv, before, proc, time.monotonic(), skip)
    yield runs
    for run in runs.values():
        if run.proc is not None and run.proc.poll() is None:
            run.proc.kill()
            run.proc.wait()


@pytest.mark.parametrize("case", SUBPROCESS_CASES, ids=[c.id for c in SUBPROCESS_CASES])
def test_hostile_cli_in_a_real_process(case: SubCase, launched: dict[str, Launched]) -> None:
    run = launched[case.id]
    if run.skip:
        pytest.skip(run.skip)
    assert run.proc is not None
    t = run.t
    try:
        out, err = run.proc.communicate(timeout=max(1.0, case.timeout - (time.monotonic() - run.started)))
    except subprocess.TimeoutExpired:
        run.proc.kill()
        run.proc.communicate()
        pytest.fail(f"`quantlab {' '.join(run.argv)}` hung for {case.timeout} s")
    finally:
        for rel in ("model.onnx", "ro"):
            if (t / rel).exists():
                (t / rel).chmod(0o755 if (t / rel).is_dir() else 0o644)
    after = snapshot(t)
    if run.proc.returncode == 97 and case.real == "tmpfs-out":
        pytest.skip(f"cannot mount a tmpfs here: {err.strip()}")
    if case.real == "tmpfs-out":
        left = [line for line in err.splitlines() if line.startswith("LEFT:")]
        assert left == ["LEFT:"], f"the full disk keeps files after the failure: {left}"
        err = "\n".join(line for line in err.splitlines() if not line.startswith("LEFT:"))
    assert run.proc.returncode == case.code, f"exit code {run.proc.returncode}, expected {case.code}; stderr:\n{err}"
    assert_one_error_line(err, out, run.argv[0], [_format(n, t) for n in case.names], [], folder=t)
    assert_nothing_else_changed(run.before, after, ())


# ─────────────────────────────── signals ───────────────────────────────

PAUSING_QUANTLAB = """\
import faulthandler, os, pathlib, runpy, signal, sys, time
marker, when = pathlib.Path(sys.argv[1]), sys.argv[2]
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for every thread's stack if it hangs

def pause():
    marker.touch()
    time.sleep(600)

class PauseAtNumpy:
    def find_spec(self, name, path=None, target=None):
        if name == "numpy" and not marker.exists():
            pause()
        return None

real_replace = os.replace

def slow_replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fspath(src)).endswith(".tmp") and not marker.exists():
        pause()
    return real_replace(src, dst, *args, **kwargs)

if when == "start-up":
    sys.meta_path.insert(0, PauseAtNumpy())
else:
    os.replace = slow_replace
sys.argv = ["quantlab", *sys.argv[3:]]
runpy.run_module("quantlab", run_name="__main__", alter_sys=True)
"""
"""``python -c PAUSING_QUANTLAB MARKER WHEN ARGS...`` is ``python -m quantlab ARGS...`` that, at one point,
touches MARKER and waits (10 minutes at most): ``start-up`` when quantlab first imports numpy (start-up
imports), ``writing`` at the first rename of a temp file (the output is being written). The test signals it
once MARKER exists."""


@dataclass(frozen=True)
class SignalCase:
    id: str
    signum: int
    code: int
    when: str  # "start-up" or "writing"


SIGNAL_CASES = [
    SignalCase("sigint-at-start-up", signal.SIGINT, 130, "start-up"),
    SignalCase("sigterm-at-start-up", signal.SIGTERM, 143, "start-up"),
    SignalCase("sigint-while-writing", signal.SIGINT, 130, "writing"),
    SignalCase("sigterm-while-writing", signal.SIGTERM, 143, "writing"),
]


@pytest.mark.parametrize("case", SIGNAL_CASES, ids=[c.id for c in SIGNAL_CASES])
def test_signal(case: SignalCase, launched: dict[str, Launched]) -> None:
    """One line saying what was interrupted, no traceback, exit 130/143, temp files removed, the earlier
    output (prev_cal/, which this run replaces) intact."""
    run = launched[case.id]
    proc, marker = run.proc, run.marker
    assert proc is not None and marker is not None
    try:
        deadline = run.started + 120
        while not marker.exists():
            assert proc.poll() is None, f"finished before the pause point: {proc.communicate()}"
            assert time.monotonic() < deadline, "never reached the pause point"
            time.sleep(0.05)
        proc.send_signal(case.signum)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)
            time.sleep(2)
            proc.kill()
            _, err = proc.communicate()
            pytest.fail(f"still running 60 s after {signal.Signals(case.signum).name}; its threads:\n{err}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after = snapshot(run.t)
    assert proc.returncode == case.code, f"exit code {proc.returncode}, expected {case.code}; stderr:\n{err}"
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and INTERRUPTED_LINE.match(lines[-1]), f"no one-line 'interrupted' message last; stderr:\n{err}"
    assert sum(bool(INTERRUPTED_LINE.match(line)) for line in lines) == 1, err
    assert not [line for line in lines if ERROR_LINE.match(line)], err
    assert_nothing_else_changed(run.before, after, ())
