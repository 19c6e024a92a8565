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
