"""What every output records: quantlab's own source hash beside the package versions."""

from __future__ import annotations

import shutil

from quantlab import fingerprint


def test_source_hash_changes_with_any_edit_of_the_package_and_only_then(tmp_path, monkeypatch):
    """A checkout between releases keeps the version number; the source hash tells its outputs apart (and
    ``quantlab run`` keys its stages on it, so an edited quantlab does not reuse what the old one made)."""
    copy = tmp_path / "quantlab"
    shutil.copytree(fingerprint.package_root(), copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "notes.txt").write_text("not source")  # only .py files count

    def hash_of(root):
        monkeypatch.setattr(fingerprint, "package_root", lambda: root)
        fingerprint.source_hash.cache_clear()
        try:
            return fingerprint.source_hash()
        finally:
            fingerprint.source_hash.cache_clear()

    real = fingerprint.source_hash()
    assert hash_of(copy) == real and len(real) == 16
    table = copy / "table.py"
    table.write_text(table.read_text() + "\n# an edit\n")
    edited = hash_of(copy)
    (copy / "table.py").rename(copy / "tables.py")  # a renamed module is another package
    assert len({real, edited, hash_of(copy)}) == 3
    monkeypatch.undo()
    assert fingerprint.tool_versions()["quantlab-source"] == real


def test_stage_keys_record_the_source_hash():
    from quantlab.experiment.store import package_versions

    assert package_versions()["quantlab-source"] == fingerprint.source_hash()
