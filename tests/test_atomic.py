from __future__ import annotations

import pytest

from quantlab.atomic import atomic_dir, json_dumps, write_json, write_text


def test_write_is_atomic_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"b": 1, "a": [1.5, 2]})
    before = target.read_bytes()
    assert before == json_dumps({"a": [1.5, 2], "b": 1}).encode()

    class Boom(Exception):
        pass

    from quantlab.atomic import atomic_path

    with pytest.raises(Boom):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise Boom
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["out.json"]


def test_atomic_dir_replaces_only_when_complete(tmp_path):
    target = tmp_path / "report"
    with atomic_dir(target) as d:
        write_text(d / "index.html", "v1")
    assert (target / "index.html").read_text() == "v1"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            write_text(d / "index.html", "v2-partial")
            raise RuntimeError("interrupted")
    assert (target / "index.html").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report"]
    with atomic_dir(target) as d:
        write_text(d / "index.html", "v2")
    assert (target / "index.html").read_text() == "v2"


def test_outputs_get_the_usual_permissions_not_mkstemps_0600(tmp_path):
    import os
    import stat

    from quantlab.atomic import atomic_dir, write_text

    mask = os.umask(0o022)
    try:
        f = write_text(tmp_path / "a.txt", "x")
        with atomic_dir(tmp_path / "d") as d:
            (d / "b").write_text("y")
    finally:
        os.umask(mask)
    assert stat.S_IMODE(os.stat(f).st_mode) == 0o644
    assert stat.S_IMODE(os.stat(tmp_path / "d").st_mode) == 0o755


# --------------------------------------------------------------------------- whose temp files, whose folders


def _dead_pid() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_temp_names_carry_the_pid_and_say_whose_they_are(tmp_path):
    import os

    from quantlab.atomic import TEMP_NAME, atomic_path, writes_in_progress

    with atomic_path(tmp_path / "out.json") as tmp:
        match = TEMP_NAME.match(tmp.name)
        assert match and match["name"] == "out.json" and int(match["pid"]) == os.getpid()
        assert writes_in_progress() == (tmp_path / "out.json",)
        tmp.write_text("x")
    assert writes_in_progress() == ()
    with atomic_dir(tmp_path / "d") as d:
        assert TEMP_NAME.match(d.name) and d.name.startswith(f".d.{os.getpid()}.")
    with atomic_dir(tmp_path / "d") as d:  # replacing: the old folder goes aside under a pid-stamped name too
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "out.json"]


def test_stale_temp_entries_of_dead_processes_are_swept(tmp_path):
    import os

    from quantlab.atomic import sweep_stale

    dead = _dead_pid()
    stale = [tmp_path / f".a.json.{dead}.abc_1234.tmp", tmp_path / f".rep.{dead}.zzzzzzzz.old"]
    stale[0].write_text("half")
    stale[1].mkdir()
    (stale[1] / "index.html").write_text("old")
    kept = [tmp_path / f".a.json.{os.getpid()}.abc_1234.tmp",  # this (running) process
            tmp_path / f".a.json.{dead}.tmp",  # no token: not quantlab's pattern
            tmp_path / f".a.json.{dead}.ABCDEFGH.tmp",  # upper case: mkstemp never makes it
            tmp_path / f"a.json.{dead}.abc_1234.tmp"]  # no leading dot
    for p in kept:
        p.write_text("keep")
    assert sorted(sweep_stale(tmp_path)) == sorted(stale)
    assert all(p.read_text() == "keep" for p in kept)
    write_text(tmp_path / "b.txt", "x")  # every write sweeps its folder
    assert sweep_stale(tmp_path) == []


def test_foreign_files_and_replaceable_folders(tmp_path):
    from quantlab.atomic import check_replaceable, foreign_files
    from quantlab.errors import OutputError

    out = tmp_path / "out"
    check_replaceable(out, ["a.json"])  # absent: fine
    out.mkdir()
    check_replaceable(out, ["a.json"])  # empty: fine
    (out / "a.json").write_text("1")
    (out / "stages" / "x").mkdir(parents=True)
    (out / "stages" / "x" / "k.json").write_text("1")
    (out / "empty").mkdir()
    assert foreign_files(out, ["a.json", "stages/*"]) == []
    (out / "stages" / "notes.txt").write_text("mine")
    (out / "link").symlink_to(tmp_path)
    assert foreign_files(out, ["a.json"]) == ["link", "stages/notes.txt", "stages/x/k.json"]
    with pytest.raises(OutputError, match=r"not a previous calibrate output \(link, stages/notes.txt"):
        check_replaceable(out, ["a.json", "stages/x/*"], label="--out out", writer="calibrate")
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_replaceable(tmp_path / "file", ["*"])


def test_atomic_dir_never_deletes_what_its_writer_does_not_own(tmp_path):
    from quantlab.errors import OutputError

    target = tmp_path / "out"
    with atomic_dir(target, owned=["index.html"]) as d:
        write_text(d / "index.html", "v1")
    (target / "notes.txt").write_text("keep me")
    with pytest.raises(OutputError, match="notes.txt"):
        with atomic_dir(target, owned=["index.html"]) as d:
            write_text(d / "index.html", "v2")
    assert (target / "notes.txt").read_text() == "keep me" and (target / "index.html").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_os_error_without_a_file_name_names_the_target(tmp_path):
    import errno

    from quantlab.atomic import atomic_path

    with pytest.raises(OSError) as info:
        with atomic_path(tmp_path / "table.parquet"):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert info.value.filename == str(tmp_path / "table.parquet")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(OSError) as info:  # a temporary path in the message becomes the path asked for
        with atomic_dir(tmp_path / "out") as d, atomic_path(d / "a.csv") as tmp:
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert info.value.filename == str(tmp_path / "out" / "a.csv")
    with pytest.raises(OSError) as info:
        with atomic_dir(tmp_path / "out") as d:
            raise OSError(errno.ENOSPC, "No space left on device", str(d / "sub" / "b.csv"))
    assert info.value.filename == str(tmp_path / "out" / "sub" / "b.csv")
    assert list(tmp_path.iterdir()) == []


def test_remove_empty_folders_keeps_every_file(tmp_path):
    from quantlab.atomic import remove_empty_folders

    (tmp_path / "out" / "work" / "evaluations").mkdir(parents=True)
    (tmp_path / "out" / "keep" / "deep").mkdir(parents=True)
    (tmp_path / "out" / "keep" / "log.jsonl").write_text("x")
    remove_empty_folders(tmp_path / "out")
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == [
        "out", "out/keep", "out/keep/log.jsonl"]
    (tmp_path / "out" / "keep" / "log.jsonl").unlink()
    remove_empty_folders(tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_check_writable_probes_the_folder_that_will_hold_the_temp_files(tmp_path, monkeypatch):
    import errno
    import os
    import tempfile

    from quantlab.atomic import check_writable
    from quantlab.errors import OutputError, ResourceError

    check_writable(tmp_path / "new" / "deeper" / "out")  # nothing exists yet: tmp_path is probed
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file"):
        check_writable(tmp_path / "f" / "out", label="--out f/out")
    real = tempfile.mkstemp

    def full(*args, **kwargs):
        if kwargs.get("dir") == tmp_path:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", full)
    with pytest.raises(ResourceError, match=r"--out x/out: cannot write into .*No space left.*free space"):
        check_writable(tmp_path / "x" / "out", label="--out x/out")
