"""Per-input batch axes (issue 14, part 2): a recurrent state batched on axis 1, a scalar with no batch axis.

The voice-activity test model with ``sr`` a real input: ``input[N, 64]``, ``state[2, N, 128]``,
``sr`` a scalar. In-memory arrays (``from_arrays(batch_axes=...)``) and manifests
(``[inputs] state = { field = "state", batch_axis = 1 }``) feed it; check_inputs checks
against those axes and calibration runs.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import models
import numpy as np
import onnx
import pytest

from quantlab.calibrate import calibrate
from quantlab.cli import main as cli_main
from quantlab.data import check_inputs, from_arrays, open_dataset
from quantlab.errors import DataError, InputMismatchError, ManifestError
from quantlab.graph import model_from_proto

AXES = {"state": 1, "sr": None}


def _vad() -> onnx.ModelProto:
    proto = models.voice_activity()
    del proto.graph.initializer[[i.name for i in proto.graph.initializer].index("sr")]  # sr: fed by the data
    return proto


def _arrays(n: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"input": rng.normal(size=(n, 64)).astype(np.float32),
            "state": rng.normal(0, 0.5, size=(2, n, 128)).astype(np.float32),
            "sr": np.array(16000, np.int64)}


def test_arrays_with_batch_axes_fit_and_calibrate_the_same_whatever_the_batch_size():
    model = model_from_proto(_vad(), label="vad")
    data = from_arrays(_arrays(), batch_axes=AXES)
    check_inputs(data, model, batch_size=4)
    assert data.sample(2).feeds["state"].shape == (2, 128) and data.sample(2).feeds["sr"].shape == ()
    last = list(data.batches(4))[-1]
    assert last.feeds["state"].shape == (2, 2, 128) and last.feeds["sr"].shape == ()
    np.testing.assert_array_equal(last.feeds["state"], _arrays()["state"][:, 4:6])
    four, one = (calibrate(model, data, "minmax", batch_size=b) for b in (4, 1))
    assert four.data.sha256 == one.data.sha256 and four.data.count == 6  # samples hashed per sample
    assert four.tables["minmax"].ranges["h_prev"] == one.tables["minmax"].ranges["h_prev"]
    assert "enc" in four.tables["minmax"].ranges and "enc_16k" not in four.tables["minmax"].ranges  # If kept


def test_without_batch_axes_the_error_says_what_to_write():
    with pytest.raises(DataError, match=r"batch_axes=\{'state': 1, 'sr': None\}"):
        from_arrays(_arrays())
    model = model_from_proto(_vad(), label="vad")
    data = from_arrays({**_arrays(), "state": np.zeros((6, 2, 128), np.float32)}, batch_axes={"sr": None})
    with pytest.raises(InputMismatchError, match=r"input 'state'.*fixed batch of 2.*batch_axis = 1"):
        check_inputs(data, model, batch_size=4)
    no_rate = from_arrays({k: v for k, v in _arrays().items() if k != "sr"}, batch_axes={"state": 1})
    with pytest.raises(InputMismatchError, match=r"expects input 'sr'.*bind it instead: --bind sr=VALUE"):
        check_inputs(no_rate, model, batch_size=4)  # a scalar that decides an If: bind it, once for all samples


def test_an_input_without_batch_axis_must_agree_within_a_batch():
    arrays = {**_arrays(), "sr": np.array([16000, 16000, 8000, 16000, 16000, 16000], np.int64)}
    data = from_arrays(arrays, batch_axes={"state": 1})  # sr batched on axis 0: a value per sample
    with pytest.raises(InputMismatchError, match="input 'sr'"):
        check_inputs(data, model_from_proto(_vad(), label="vad"))  # the model's sr is a scalar: no batch axis
    from quantlab.data import Sample
    from quantlab.data.batches import stack_input

    samples = [Sample(i, f"s{i}", {"sr": np.array(v)}) for i, v in enumerate((16000, 8000))]
    with pytest.raises(DataError, match="'s1' differs from sample 's0'"):
        stack_input("sr", samples, None)


def _npz_folder(tmp_path: Path, n: int = 5) -> Path:
    folder = tmp_path / "chunks"
    folder.mkdir()
    arrays = _arrays(n)
    for i in range(n):
        np.savez(folder / f"chunk{i}.npz", input=arrays["input"][i], state=arrays["state"][:, i], sr=arrays["sr"])
    return folder


MANIFEST = """\
shuffle = false
[source]
kind = "npz"
path = "chunks"
[inputs]
input = "input"
state = {{ field = "state", batch_axis = {axis} }}
sr = {{ field = "sr", batch_axis = "none" }}
"""


def test_manifest_batch_axes_feed_the_state_on_axis_1_and_the_scalar_once(tmp_path):
    _npz_folder(tmp_path)
    (tmp_path / "vad.toml").write_text(MANIFEST.format(axis=1))
    data = open_dataset(tmp_path / "vad.toml")
    model = model_from_proto(_vad(), label="vad")
    check_inputs(data, model, batch_size=2)
    batch = next(data.batches(2))
    assert batch.feeds["state"].shape == (2, 2, 128) and batch.feeds["sr"].shape == ()
    np.testing.assert_array_equal(batch.feeds["state"], _arrays(5)["state"][:, :2])
    result = calibrate(model, data, "minmax", batch_size=2)
    assert result.data.count == 5 and "h_prev" in result.tables["minmax"].ranges


def test_manifest_batch_axis_errors_name_the_table_and_key(tmp_path):
    _npz_folder(tmp_path)
    (tmp_path / "bad.toml").write_text(MANIFEST.format(axis='"one"'))
    with pytest.raises(ManifestError, match=r"bad.toml: \[inputs.state\] key 'batch_axis'.*an integer >= 0, or \"none\""):
        open_dataset(tmp_path / "bad.toml")


def test_complete_feeds_are_files_of_batch_1_in_the_models_own_layout(tmp_path):
    """feeds = "complete": each file holds what the model takes for one sample (state [2, 1, 128], sr a scalar)."""
    folder = tmp_path / "feeds"
    folder.mkdir()
    arrays = _arrays(3)
    for i in range(3):
        np.savez(folder / f"f{i}.npz", input=arrays["input"][i:i + 1], state=arrays["state"][:, i:i + 1],
                 sr=arrays["sr"])
    text = MANIFEST.format(axis=1).replace('path = "chunks"', 'path = "feeds"')
    (tmp_path / "complete.toml").write_text('feeds = "complete"\n' + text)
    data = open_dataset(tmp_path / "complete.toml")
    model = model_from_proto(_vad(), label="vad")
    check_inputs(data, model, batch_size=3)
    batch = next(data.batches(3))
    np.testing.assert_array_equal(batch.feeds["state"], arrays["state"])
    np.testing.assert_array_equal(batch.feeds["input"], arrays["input"])
    np.savez(folder / "f9.npz", input=arrays["input"][:2], state=arrays["state"][:, :2], sr=arrays["sr"])
    again = open_dataset(tmp_path / "complete.toml")
    with pytest.raises(DataError, match=r"'feeds/f9.npz'.*input 'input' is \[2, 64\].*batch 1 on axis 0"):
        list(again.batches(4))


def test_sequence_mode_carries_the_state_output_into_the_next_batch():
    from quantlab.backends import get_backend
    from quantlab.sequence import SequenceData

    model = model_from_proto(_vad(), label="vad")
    arrays = _arrays(5)
    data = SequenceData(from_arrays(arrays, batch_axes=AXES), model, {"stateN": "state"})
    check_inputs(data, model, batch_size=2)
    batches = list(data.batches(2))
    np.testing.assert_array_equal(batches[0].feeds["state"], arrays["state"][:, :2])  # the first keeps the data's
    runner = get_backend("ort").build(model.proto)
    try:
        expected = runner.run(batches[0].feeds)["stateN"]
        np.testing.assert_array_equal(batches[1].feeds["state"], expected)  # two streams, each continued
        shorter = runner.run(batches[1].feeds)["stateN"][:, :1]
    finally:
        runner.close()
    np.testing.assert_array_equal(batches[2].feeds["state"], shorter)  # the last batch: the first stream only
    table = calibrate(model, data, "minmax", batch_size=2).tables["minmax"]
    assert table.calib_set["manifest"]["sequence"] == {"carry": {"stateN": "state"}}
    with pytest.raises(InputMismatchError, match="'hidden'"):
        SequenceData(from_arrays(arrays, batch_axes=AXES), model, {"stateN": "hidden"})


def test_manifest_sequence_carry_is_parsed_for_sequence_data(tmp_path):
    from quantlab.sequence import SequenceData

    _npz_folder(tmp_path)
    (tmp_path / "seq.toml").write_text(MANIFEST.format(axis=1) + '[sequence]\ncarry = { stateN = "state" }\n')
    data = open_dataset(tmp_path / "seq.toml")
    assert data.sequence_carry == {"stateN": "state"}
    model = model_from_proto(_vad(), label="vad")
    result = calibrate(model, SequenceData(data, model, data.sequence_carry), "minmax", batch_size=1)
    assert result.data.count == 5
    (tmp_path / "bad.toml").write_text(MANIFEST.format(axis=1) + '[sequence]\ncary = { stateN = "state" }\n')
    with pytest.raises(ManifestError, match=r"\[sequence\] key 'cary'.*Did you mean 'carry'"):
        open_dataset(tmp_path / "bad.toml")


def test_a_set_with_a_carry_keeps_its_stream_order_and_refuses_shuffle(tmp_path):
    """shuffle defaults to true: with a [sequence] carry each chunk got the state an unrelated chunk left (Silero
    VAD v6's cell state ranged -9.7..24.5 instead of -5.9..24.2), without a word. A carry now keeps the listed
    order; an explicit shuffle = true is refused, naming the key."""
    _npz_folder(tmp_path)
    body = MANIFEST.format(axis=1).replace("shuffle = false\n", "")
    carry = '[sequence]\ncarry = { stateN = "state" }\n'
    (tmp_path / "seq.toml").write_text(body + carry)
    (tmp_path / "plain.toml").write_text(body)
    keys = open_dataset(tmp_path / "seq.toml").keys()
    assert keys == sorted(keys) and len(keys) == 5
    assert open_dataset(tmp_path / "plain.toml").keys() != keys  # shuffled
    (tmp_path / "bad.toml").write_text("shuffle = true\n" + body + carry)
    with pytest.raises(ManifestError, match=r"key 'shuffle'.*stream order; remove shuffle = true"):
        open_dataset(tmp_path / "bad.toml")


def test_text_lines_of_several_widths_batch_by_shape_and_give_the_engine_profile(tmp_path):
    """batching = "by_shape": the OCR recognizer's lines of 64/128/192 px, calibrated; profiles from the batches."""
    from quantlab.shapes import ShapeLog, profiles_from_data

    folder = tmp_path / "lines"
    folder.mkdir()
    rng = np.random.default_rng(0)
    widths = [64, 128, 64, 192, 64, 128, 64]
    for i, w in enumerate(widths):
        np.save(folder / f"line{i}.npy", rng.uniform(-1, 1, (3, 48, w)).astype(np.float32))
    text = 'shuffle = false\n[source]\nkind = "npy"\npath = "lines"\n[inputs]\nimage = "array"\n'
    (tmp_path / "in_order.toml").write_text(text)
    with pytest.raises(DataError, match='batching = "by_shape"'):
        list(open_dataset(tmp_path / "in_order.toml").batches(2))
    (tmp_path / "lines.toml").write_text('batching = "by_shape"\n' + text)
    data = open_dataset(tmp_path / "lines.toml")
    batches = list(data.batches(2))
    assert [(b.indices, b.feeds["image"].shape[-1]) for b in batches] == [
        ((0, 2), 64), ((1, 5), 128), ((4, 6), 64), ((3,), 192)]
    assert [(b.indices, b.feeds["image"].shape[-1]) for b in data.batches(2)] == [
        (b.indices, b.feeds["image"].shape[-1]) for b in batches]  # the same batches every pass
    model = model_from_proto(models.text_recognizer(), label="text_recognizer")
    result = calibrate(model, data, "minmax", batch_size=2)
    assert result.data.count == 7
    log = ShapeLog()
    for batch in batches:
        log.observe(batch.feeds)
    image = profiles_from_data({"image": (-1, 3, 48, -1)}, log)["image"]
    assert (image.min, image.opt, image.max) == ((1, 3, 48, 64), (2, 3, 48, 64), (2, 3, 48, 192))


def test_a_selection_of_a_set_in_file_order_batches_its_sizes_apart(tmp_path):
    """A set whose files keep their sizes apart by order alone (DINOv2 images of 56 then 70 px; here text lines
    of 64 then 128, batch 2) runs in file order; a search's ranking subset of its worst and spread samples paired
    a 56 with a 70 and failed with "samples of a batch must match" on a manifest compare accepts. A selection
    batches equal shapes together."""
    from quantlab.search import SearchOptions, search

    folder = tmp_path / "lines"
    folder.mkdir()
    rng = np.random.default_rng(1)
    widths = [64, 64, 64, 64, 128, 128, 128, 128]
    for i, w in enumerate(widths):
        np.save(folder / f"line{i}.npy", rng.uniform(-1, 1, (3, 48, w)).astype(np.float32))
    (tmp_path / "in_order.toml").write_text('shuffle = false\nrole = "validation"\n[source]\nkind = "npy"\n'
                                            'path = "lines"\n[inputs]\nimage = "array"\n')
    data = open_dataset(tmp_path / "in_order.toml")
    assert [b.indices for b in data.batches(2)] == [(0, 1), (2, 3), (4, 5), (6, 7)]
    picked = data.select([7, 0, 5, 2])
    assert [(b.indices, b.feeds["image"].shape[-1]) for b in picked.batches(2)] == [((7, 5), 128), ((0, 2), 64)]
    model = model_from_proto(models.text_recognizer(), label="text_recognizer")
    table = calibrate(model, data, "minmax", batch_size=2).tables["minmax"]
    found = search(model, table, data, SearchOptions(threshold="sqnr_db>=60", batch_size=2, probe_samples=4,
                                                     budget=2))
    assert any(n.startswith("ranking subset: the 2 validation samples the all-INT8 model gets worst")
               for n in found.notes)  # it ranked on samples of both widths


@pytest.mark.parametrize("batch_size", [1, 4])
def test_compare_gives_per_sample_rows_for_an_output_batched_on_axis_1(batch_size):
    """``stateN [2, N, 128]`` has its samples on axis 1: one per-sample row per sample, as for ``prob``."""
    import quantlab as ql

    model = model_from_proto(_vad(), label="vad")
    data = from_arrays(_arrays(6), batch_axes=AXES)
    table = calibrate(model, data, "minmax").tables["minmax"]
    int8 = ql.write_model(model, ql.uniform_plan("int8"), table, ql.WriteOptions(target="ort"))
    options = ql.CompareOptions(batch_size=batch_size)  # per-layer figures too
    result = ql.compare(model, {"int8": int8}, from_arrays(_arrays(6, seed=1), batch_axes=AXES), options)
    rows = result.per_sample
    for output in ("prob", "stateN"):
        mine = rows[rows["output"] == output]
        assert list(mine["sample"]) == list(range(6)), output
    # sample 3's stateN row is the error of that sample's [2, 128] slice alone
    state = rows[(rows["output"] == "stateN")].set_index("sample")
    alone = ql.compare(model, {"int8": int8}, from_arrays({k: (v[:, 3:4] if k == "state" else v if k == "sr" else v[3:4])
                                                           for k, v in _arrays(6, seed=1).items()}, batch_axes=AXES),
                       ql.CompareOptions(batch_size=1, per_layer=False)).per_sample
    alone = alone[alone["output"] == "stateN"].iloc[0]
    assert state.loc[3, "max_abs"] == alone["max_abs"]
    np.testing.assert_allclose(state.loc[3, "cosine"], alone["cosine"], rtol=1e-6)


def _sequences(tmp_path: Path, lengths: list[int]) -> list[np.ndarray]:
    folder = tmp_path / "seqs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    arrays = [rng.normal(size=(n, 4)).astype(np.float32) for n in lengths]
    for i, a in enumerate(arrays):
        np.savez(folder / f"s{i}.npz", x=a)
    return arrays


PADDED = 'shuffle = false\n[source]\nkind = "npz"\npath = "seqs"\n[pad]\n'


def test_pad_makes_one_length_per_batch_with_a_mask_and_records_it(tmp_path):
    """[pad]: sentences of 5, 8, 3 tokens padded per batch (to a multiple of 4), the mask made by quantlab."""
    arrays = _sequences(tmp_path, [5, 8, 3])
    (tmp_path / "p.toml").write_text(PADDED + 'inputs = ["x"]\nvalue = -7.0\nto = 4\nmask = "mask"\n'
                                     'mask_values = [0.0, -1e9]\n')
    data = open_dataset(tmp_path / "p.toml")
    assert data.input_names == ("x", "mask")
    assert data.sample(0).feeds["mask"].tolist() == [0.0] * 5  # a sample alone: unpadded, all real
    first, last = list(data.batches(2))
    assert first.feeds["x"].shape == (2, 8, 4) and last.feeds["x"].shape == (1, 4, 4)  # 3 -> next multiple of 4
    np.testing.assert_array_equal(first.feeds["x"][0, :5], arrays[0])
    assert (first.feeds["x"][0, 5:] == -7.0).all() and first.feeds["mask"].dtype == np.float32
    assert first.feeds["mask"].tolist() == [[0.0] * 5 + [-1e9] * 3, [0.0] * 8]
    record = data.manifest_record()["padding"]
    assert record == {"inputs": ["x"], "value": -7.0, "axis": 0, "to": 4, "mask": "mask",
                      "mask_values": [0.0, -1e9], "mask_dtype": "float32"}
    (tmp_path / "int.toml").write_text(PADDED + 'inputs = ["x"]\nmask = "attention_mask"\n')
    batch = next(open_dataset(tmp_path / "int.toml").batches(3))  # defaults: pad with 0 to the longest, mask 1/0
    assert batch.feeds["x"].shape == (3, 8, 4) and batch.feeds["attention_mask"].dtype == np.int64
    assert batch.feeds["attention_mask"].sum(axis=1).tolist() == [5, 8, 3]


@pytest.mark.parametrize("to, alone", [("\"max\"", [5, 8, 3, 2]), ("4", [8, 8, 4, 4])])
def test_engine_profiles_admit_the_shortest_sample_alone_not_only_the_padded_batches(tmp_path, to, alone):
    """A 2-token sentence batched with an 8-token one is padded to 8, but an engine serving one request at a
    time is fed its own 2 (or 4 with ``to = 4``): the table records each sample padded alone, and the profile's
    minimum comes from there (it was the shortest padded batch)."""
    from quantlab.shapes import ShapeLog, shapes_for_table

    _sequences(tmp_path, [5, 8, 3, 2])
    (tmp_path / "p.toml").write_text(PADDED + f'inputs = ["x"]\nto = {to}\nmask = "mask"\nmask_values = [0.0, -1e9]\n')
    data = open_dataset(tmp_path / "p.toml")
    batches = list(data.batches(2))
    assert [b.feeds["x"].shape[1] for b in batches] == [8, 4 if to == "4" else 3]  # padded per batch
    assert [s[0] for b in batches for s in b.alone_shapes["x"]] == alone
    assert [s[0] for b in batches for s in b.alone_shapes["mask"]] == alone
    log = ShapeLog.of(batches)
    assert sorted(shape[1] for shape in log.shapes("x")) == sorted(set(alone))
    assert sum(log.shapes("x").values()) == 4  # one count per sample
    model = model_from_proto(models.dynamic_attention(hidden=4))
    table = calibrate(model, data, "minmax", batch_size=2).tables["minmax"]
    recorded = {tuple(row[:-1]): row[-1] for row in table.calib_set["input_shapes"]["x"]}
    assert recorded == {(1, n, 4): alone.count(n) for n in alone}
    ranges = shapes_for_table(None, table.calib_set, {"x": (-1, -1, 4), "mask": (-1, -1)}, batch=8)
    assert ranges["x"].min == (1, min(alone), 4) and ranges["x"].max == (8, max(alone), 4)
    assert ranges["mask"].min == (1, min(alone)) and ranges["mask"].max == (8, max(alone))


@pytest.mark.parametrize("table, message", [
    ('inputs = "x"', r"p.toml: line 6: \[pad\] key 'inputs': must be a non-empty list.*inputs = \[\"input_ids\"\]"),
    ('inputs = ["x"]\nto = 0', r"\[pad\] key 'to': must be \"max\" or an integer >= 1.*to = \"max\""),
    ('value = 0', r"(?s)\[pad\]: no 'inputs'.*inputs = \[\"input_ids\"\]"),
    ('inputs = ["x"]\nmask_values = [1, 0]', r"\[pad\] key 'mask_values': set without 'mask'"),
    ('inputs = ["x"]\npadding = 1', r"\[pad\] key 'padding': unknown key"),
    ('inputs = ["y"]', r"p.toml: \[pad\] key 'inputs' names \['y'\], which the data set does not feed.*inputs = \[\"x\"\]"),
    ('inputs = ["x"]\nmask = "x"', r"\[pad\] key 'mask'.*named twice"),
])
def test_pad_errors_name_the_manifest_and_key_with_an_example(tmp_path, table, message):
    _sequences(tmp_path, [2, 3])
    (tmp_path / "p.toml").write_text(PADDED + table + "\n")
    with pytest.raises(ManifestError, match=message):
        open_dataset(tmp_path / "p.toml")


def test_pad_axis_outside_a_sample_names_the_sample_and_input(tmp_path):
    _sequences(tmp_path, [2, 3])
    (tmp_path / "p.toml").write_text(PADDED + 'inputs = ["x"]\naxis = 2\n')
    with pytest.raises(DataError, match=r"sample 'seqs/s0.npz': input 'x' is \[2, 4\] and has no axis 2"):
        list(open_dataset(tmp_path / "p.toml").batches(2))


def _sequence_and_plain_sets(tmp_path: Path):
    """The vad model, and its chunks as a manifest with ``[sequence] carry`` and as one without."""
    _npz_folder(tmp_path)
    (tmp_path / "seq.toml").write_text(MANIFEST.format(axis=1) + '[sequence]\ncarry = { stateN = "state" }\n')
    (tmp_path / "plain.toml").write_text(MANIFEST.format(axis=1))
    model = model_from_proto(_vad(), label="vad")
    return model, open_dataset(tmp_path / "seq.toml"), open_dataset(tmp_path / "plain.toml")


def test_a_manifest_carry_reaches_calibrate_and_compare_without_wrapping(tmp_path):
    """quantlab.calibrate / compare put a manifest's ``[sequence] carry`` in force themselves (the CLI passes
    manifests as they are): the state of the second sample is the model's stateN after the first."""
    import quantlab as ql
    from quantlab.sequence import SequenceData

    model, seq, plain = _sequence_and_plain_sets(tmp_path)
    by_manifest = calibrate(model, seq, "minmax", batch_size=1)
    wrapped = calibrate(model, SequenceData(plain, model, {"stateN": "state"}), "minmax", batch_size=1)
    without = calibrate(model, plain, "minmax", batch_size=1)
    assert by_manifest.data.sha256 == wrapped.data.sha256 != without.data.sha256
    assert by_manifest.tables["minmax"].ranges["c_prev"] == wrapped.tables["minmax"].ranges["c_prev"]
    assert by_manifest.tables["minmax"].calib_set["manifest"]["sequence"] == {"carry": {"stateN": "state"}}
    int8 = ql.write_model(model, ql.uniform_plan("int8"), by_manifest.tables["minmax"], ql.WriteOptions(target="ort"))
    options = ql.CompareOptions(batch_size=1, per_layer=False, bootstrap=0)
    compared = ql.compare(model, {"int8": int8}, seq, options)
    assert compared.data["manifest"]["sequence"] == {"carry": {"stateN": "state"}}
    with pytest.raises(ql.CompareError, match="sequence"):
        ql.compare(model, {"int8": int8}, seq, ql.CompareOptions(batch_size=1, shards=2))


def test_a_sample_taken_alone_gets_the_state_its_stream_carries_into_it():
    """A search's ranking subset and ``sample(i)`` see the state the batches carry (teacher forcing at the set's
    batch size), not the data's own: its SQNR had been measured on states that never occur in use."""
    from quantlab.sequence import SequenceData

    model = model_from_proto(_vad(), label="vad")
    arrays = _arrays(5)
    data = SequenceData(from_arrays(arrays, batch_axes=AXES), model, {"stateN": "state"}, streams=2)
    batches = list(data.batches(2))
    np.testing.assert_array_equal(data.sample(0).feeds["state"], arrays["state"][:, 0])  # first step: the data's
    for i in (2, 3, 4):
        np.testing.assert_array_equal(data.sample(i).feeds["state"],
                                      np.take(batches[i // 2].feeds["state"], i % 2, axis=1))
    assert not np.array_equal(data.sample(3).feeds["state"], arrays["state"][:, 3])
    subset = list(data.select([3, 4]).batches(2))[0]
    np.testing.assert_array_equal(subset.feeds["state"], np.stack([data.sample(3).feeds["state"],
                                                                   data.sample(4).feeds["state"]], axis=1))
    fresh = SequenceData(from_arrays(arrays, batch_axes=AXES), model, {"stateN": "state"}, streams=2)
    np.testing.assert_array_equal(fresh.sample(4).feeds["state"], data.sample(4).feeds["state"])  # runs the set once


def test_sequence_mode_refuses_batches_by_shape_which_reorder_the_streams():
    from quantlab.sequence import SequenceData

    model = model_from_proto(_vad(), label="vad")
    data = from_arrays(_arrays(4), batch_axes=AXES)
    data.group_by_shape = True
    with pytest.raises(DataError, match=r"batching = \"by_shape\" reorders them.*number of interleaved streams"):
        SequenceData(data, model, {"stateN": "state"})


def test_sequence_mode_reaches_coverage_and_compare_says_its_figures_are_one_step(tmp_path):
    import quantlab as ql
    from quantlab.sequence import TEACHER_FORCING_NOTE

    model, seq, plain = _sequence_and_plain_sets(tmp_path)
    result = calibrate(model, seq, "minmax", batch_size=1)
    options = ql.CoverageOptions(batch_size=1)
    covered = {name: ql.check_coverage(model, [data], result.tables["minmax"], result.statistics, options=options)
               for name, data in (("seq", seq), ("plain", plain))}
    assert covered["seq"].datasets[0].summary.sha256 == result.data.sha256  # the states calibration saw
    assert covered["plain"].datasets[0].summary.sha256 != result.data.sha256
    int8 = ql.write_model(model, ql.uniform_plan("int8"), result.tables["minmax"], ql.WriteOptions(target="ort"))
    options = ql.CompareOptions(batch_size=1, per_layer=False, bootstrap=0)
    assert TEACHER_FORCING_NOTE in ql.compare(model, {"int8": int8}, seq, options).warnings
    assert TEACHER_FORCING_NOTE not in ql.compare(model, {"int8": int8}, plain, options).warnings


def test_a_batch_split_into_smaller_runs_cuts_each_input_on_its_own_sample_axis():
    """A run budget too small for a batch of 4 splits it into runs of fewer samples: ``state`` is cut on
    axis 1, the scalar ``sr`` passed whole, and the statistics equal those of batches of one."""
    from quantlab.graph import activation_names
    from quantlab.stats import collect_statistics
    from quantlab.stats.budget import resolved_sizes, samples_per_run

    model = model_from_proto(_vad(), label="vad")
    data = from_arrays(_arrays(6), batch_axes=AXES)
    first = next(iter(data.batches(4)))
    sizes = resolved_sizes(model, activation_names(model.proto), first.feeds)
    assert samples_per_run(model, sizes, 4, 4096 // 2, first.batch_axes) == 1  # runs of one sample each
    split = collect_statistics(model, lambda: data.batches(4), run_budget_bytes=4096, threads=1)
    single = collect_statistics(model, lambda: data.batches(1), threads=1)
    assert split.samples == single.samples == 6
    for name in ("h_prev", "c_prev", "gates", "stateN", "prob"):
        a, b = split[name], single[name]
        assert (a.count, a.min, a.max) == (b.count, b.min, b.max), name
        np.testing.assert_array_equal(a.counts, b.counts)


def test_sizes_decided_by_computed_values_are_data_sized():
    """A Range whose length an activation decides (``Range(0, ArgMax(x))``) is data-sized; one whose length only a
    shape decides (``Cast(Shape(x)) * 0.5``) or an integer input decides is not (their values are the same in
    every candidate)."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.graph import model_from_proto
    from quantlab.graph.samples import data_sized

    nodes = [
        helper.make_node("Relu", ["x"], ["r"], name="relu"),
        helper.make_node("ReduceMax", ["r"], ["top"], name="top", keepdims=0),
        helper.make_node("Cast", ["top"], ["top_i"], name="top_i", to=TensorProto.INT64),
        helper.make_node("Range", ["zero", "top_i", "one"], ["by_value"], name="by_value"),
        helper.make_node("Shape", ["x"], ["xs"], name="xs"),
        helper.make_node("Cast", ["xs"], ["xs_f"], name="xs_f", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs_f", "half"], ["half_size"], name="half_size"),
        helper.make_node("Cast", ["half_size"], ["half_i"], name="half_i", to=TensorProto.INT64),
        helper.make_node("ReduceMax", ["half_i"], ["half_max"], name="half_max", keepdims=0),
        helper.make_node("Range", ["zero", "half_max", "one"], ["by_shape"], name="by_shape"),
        helper.make_node("Range", ["zero", "count", "one"], ["by_input"], name="by_input"),
    ]
    graph = helper.make_graph(
        nodes, "ranges",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_value_info("count", TensorProto.INT64, [])],
        [helper.make_tensor_value_info(n, TensorProto.INT64, ["K"]) for n in ("by_value", "by_shape", "by_input")],
        [numpy_helper.from_array(np.array(0, np.int64), "zero"), numpy_helper.from_array(np.array(1, np.int64), "one"),
         numpy_helper.from_array(np.array(0.5, np.float32), "half")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    sized = data_sized(model)
    assert "by_value" in sized and not {"by_shape", "by_input"} & sized


@pytest.mark.parametrize("widen", [False, True], ids=["same-shape", "other-shape"])
def test_an_if_the_data_decides_resizes_only_the_outputs_its_branches_shape_differently(widen):
    """A streaming step's ``if state is all zeros: h = init(x) else: h = cell(x, state)`` returns [N, 16] either
    way: its outputs were listed as sized by the data (a note on every comparison); only branches that declare
    other shapes (or none) make an output data-sized."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.graph import model_from_proto
    from quantlab.graph.samples import data_sized

    def branch(name: str, op: str, shape: list) -> onnx.GraphProto:
        inputs, attrs = (["x", "x"], {"axis": 1}) if op == "Concat" else (["x"], {})
        return helper.make_graph([helper.make_node(op, inputs, [f"{name}_out"], name=f"{name}_op", **attrs)], name,
                                 [], [helper.make_tensor_value_info(f"{name}_out", TensorProto.FLOAT, shape)])

    nodes = [helper.make_node("ReduceSum", ["x"], ["total"], name="total", keepdims=0),
             helper.make_node("Greater", ["total", "zero"], ["positive"], name="positive"),
             helper.make_node("If", ["positive"], ["h"], name="choose", then_branch=branch("then", "Relu", ["N", 4]),
                              else_branch=branch("else", "Concat", ["N", 8]) if widen else branch("else", "Neg",
                                                                                                     ["N", 4])),
             helper.make_node("Relu", ["h"], ["y"], name="after")]
    graph = helper.make_graph(nodes, "step", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])],
                              [numpy_helper.from_array(np.array(0, np.float32), "zero")])
    sized = data_sized(model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    assert sized == ({"h", "y"} if widen else set())


def test_a_carried_state_with_unnamed_dims_is_compared_per_stream(tmp_path):
    """torch's LSTM exports leave ``stateN`` as ``['', '', '']`` (Silero VAD): no batch symbol says its samples are
    on axis 1, but the carry ``stateN -> state`` does. Compare at 2 streams failed with "quantlab expected the
    samples on axis 0"; now it gives the figures of the same model with the dims named."""
    import quantlab as ql

    model, seq, _ = _sequence_and_plain_sets(tmp_path)
    unnamed = _vad()
    concat = next(n for n in unnamed.graph.node if n.output[0] == "stateN")  # as torch's LSTM export does:
    concat.output[0] = "hc"  # stateN = If(batch == 1, hc, hc), whose output shape inference cannot follow
    h = onnx.helper

    def branch(name: str) -> onnx.GraphProto:  # then: squeezed and back (one stream), else: as it is
        nodes = ([h.make_node("Squeeze", ["hc", "batch_axis_index"], ["squeezed"]),
                  h.make_node("Unsqueeze", ["squeezed", "batch_axis_index"], [name])] if name == "t" else
                 [h.make_node("Identity", ["hc"], [name])])
        return h.make_graph(nodes, name, [], [h.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)])

    unnamed.graph.initializer.extend([onnx.numpy_helper.from_array(np.array(v, np.int64), n)
                                      for n, v in (("batch_axis_index", [1]), ("batch_of_one", 1))])
    unnamed.graph.node.extend([h.make_node("Shape", ["hc"], ["hc_shape"]),
                               h.make_node("Gather", ["hc_shape", "batch_axis_index"], ["batch"]),
                               h.make_node("Equal", ["batch", "batch_of_one"], ["single"]),
                               h.make_node("If", ["single"], ["stateN"], then_branch=branch("t"),
                                           else_branch=branch("e"))])
    dims = next(o for o in unnamed.graph.output if o.name == "stateN").type.tensor_type.shape.dim
    for d in dims:
        d.Clear()
    unnamed_model = model_from_proto(unnamed, label="vad, stateN dims unnamed")
    options = ql.CompareOptions(batch_size=2, per_layer=False, bootstrap=0)
    figures = []
    for reference in (model, unnamed_model):
        table = calibrate(reference, seq, "minmax", batch_size=1).tables["minmax"]
        int8 = ql.write_model(reference, ql.uniform_plan("int8"), table, ql.WriteOptions(target="tensorrt"))
        result = ql.compare(reference, {"int8": int8}, seq, options)
        frame = result.end_to_end.set_index("output")
        figures.append(frame.loc[["prob", "stateN"], ["samples", "sqnr_db", "max_abs"]])
    assert list(figures[1]["samples"]) == [5, 5]
    # prob [N, 1]: one value per sample, whose cosine is its sign (1.0 whatever the error): left out, said once
    assert np.isnan(frame.loc["prob", "cosine"]) and np.isfinite(frame.loc["stateN", "cosine"])
    assert np.isfinite(frame.loc["prob", "sqnr_db"])
    assert result.per_sample.query("output == 'prob'")["cosine"].isna().all()
    assert sum("'prob' holds one value per sample" in w for w in result.warnings) == 1
    # a session per segment and candidate: none keeps an ORT memory arena (a text recogniser took 12 GB with them)
    assert result.environment["backend"]["details"]["arena"] is False
    # a search's ranking subset: samples taken out of the stream with their carried state, compared as a set
    from quantlab.sequence import SequenceData

    ranked = []
    for reference in (model, unnamed_model):
        table = calibrate(reference, seq, "minmax", batch_size=1).tables["minmax"]
        int8 = ql.write_model(reference, ql.uniform_plan("int8"), table, ql.WriteOptions(target="tensorrt"))
        subset = SequenceData(seq, reference, {"stateN": "state"}, streams=2).select([4, 1, 3], name="ranking")
        frame = ql.compare(reference, {"int8": int8}, subset, options).end_to_end.set_index("output")
        ranked.append(frame.loc[["stateN"], ["samples", "cosine", "cosine_min", "sqnr_db"]])
    assert list(ranked[1]["samples"]) == [3]
    np.testing.assert_allclose(ranked[1].to_numpy(float), ranked[0].to_numpy(float), rtol=1e-6)
    np.testing.assert_allclose(figures[1].to_numpy(float), figures[0].to_numpy(float), rtol=1e-6)


def test_sequence_mode_also_measures_each_candidate_free_running(tmp_path):
    """Teacher forcing gives the error of one step; deployed, a candidate reads back its own state (Silero VAD's
    INT8: 23.5 dB teacher-forced, 14.3 free-running). compare runs every model over the streams on its own state
    too: the figures match a closed loop run here with ONNX Runtime directly."""
    import quantlab as ql

    model, seq, _ = _sequence_and_plain_sets(tmp_path)
    table = calibrate(model, seq, "minmax", batch_size=1).tables["minmax"]
    int8 = ql.write_model(model, ql.uniform_plan("int8"), table, ql.WriteOptions(target="ort"))
    result = ql.compare(model, {"int8": int8}, seq, ql.CompareOptions(batch_size=1, per_layer=False, bootstrap=0))
    rows = {r["output"]: r for r in result.settings["free_running"]}
    assert set(rows) == {"prob", "stateN"} and rows["prob"]["samples"] == 5
    assert sum("free-running over whole streams" in w for w in result.warnings) == 1

    chunks = [np.load(tmp_path / "chunks" / f"chunk{i}.npz") for i in range(5)]
    sessions = {"ref": models.ort_session(model.proto), "int8": models.ort_session(int8.proto)}
    state = {k: chunks[0]["state"][:, None] for k in sessions}
    got = {k: {"prob": [], "stateN": []} for k in sessions}
    for c in chunks:
        for k, s in sessions.items():
            prob, state_n = s.run(["prob", "stateN"], {"input": c["input"][None], "state": state[k], "sr": c["sr"]})
            got[k]["prob"].append(prob)
            got[k]["stateN"].append(state_n)
            state[k] = state_n
    for o, row in rows.items():
        ref, cand = (np.concatenate(got[k][o]).astype(np.float64) for k in ("ref", "int8"))
        sqnr = 10 * np.log10((ref ** 2).sum() / ((ref - cand) ** 2).sum())
        assert abs(row["sqnr_db"] - sqnr) < 0.5, (o, row["sqnr_db"], sqnr)
    # prob, a Sigmoid's, is read as speech or not (p > 0.5): the decisions of every step, pooled
    ref, cand = (np.concatenate(got[k]["prob"]) > 0.5 for k in ("ref", "int8"))
    assert rows["prob"]["element_match"] == pytest.approx((ref == cand).mean() * 100.0)
    either = (ref | cand).sum()
    assert (math.isnan(rows["prob"]["mask_iou"]) if either == 0
            else rows["prob"]["mask_iou"] == pytest.approx((ref & cand).sum() / either * 100.0))
    assert "element_match" not in rows["stateN"]  # a state, not a probability
    assert "prob masks: " in next(w for w in result.warnings if "free-running over whole streams" in w)
    assert result.end_to_end.set_index("output").loc["prob", "free_element_match"] == rows["prob"]["element_match"]


def test_free_running_figures_and_user_metrics_are_columns_a_threshold_can_judge(tmp_path):
    """Silero VAD INT8: 98-99 % speech decisions agreed teacher-forced, 86-94 % free-running, and no gate could
    read the latter. The end-to-end table holds ``free_<figure>`` and ``free_<user metric>`` columns; the metric's
    free-running mean matches a closed loop run here with ONNX Runtime, and --fail-if / the search read them."""
    import quantlab as ql
    from quantlab.cli.compare import known_metrics
    from quantlab.errors import ThresholdError
    from quantlab.search import SearchOptions, search
    from quantlab.threshold import parse_threshold

    (tmp_path / "vad_metric.py").write_text(
        "import numpy as np\n"
        "def speech(ref, cand, label):\n"
        "    return {'speech_gap': float(abs(ref['prob'] - cand['prob']).max())}\n")
    metric = f"{tmp_path / 'vad_metric.py'}:speech"
    model, seq, plain = _sequence_and_plain_sets(tmp_path)
    table = calibrate(model, seq, "minmax", batch_size=1).tables["minmax"]
    int8 = ql.write_model(model, ql.uniform_plan("int8"), table, ql.WriteOptions(target="ort"))
    result = ql.compare(model, {"int8": int8}, seq,
                        ql.CompareOptions(batch_size=1, per_layer=False, bootstrap=0, metric=metric))
    frame = result.end_to_end.set_index("output")
    rows = {r["output"]: r for r in result.settings["free_running"]}
    for o in ("prob", "stateN"):
        assert frame.loc[o, "free_sqnr_db"] == rows[o]["sqnr_db"]
    chunks = [np.load(tmp_path / "chunks" / f"chunk{i}.npz") for i in range(5)]
    sessions = {k: models.ort_session(p) for k, p in (("ref", model.proto), ("int8", int8.proto))}
    state = {k: chunks[0]["state"][:, None] for k in sessions}
    gaps = []
    for c in chunks:
        prob = {}
        for k, sess in sessions.items():
            prob[k], state[k] = sess.run(["prob", "stateN"], {"input": c["input"][None], "state": state[k],
                                                              "sr": c["sr"]})
        gaps.append(float(abs(prob["ref"] - prob["int8"]).max()))
    assert frame.loc["prob", "free_speech_gap"] == pytest.approx(np.mean(gaps), rel=1e-6)
    assert frame.loc["prob", "free_speech_gap"] != pytest.approx(frame.loc["prob", "speech_gap"], rel=1e-3)
    assert "metric speech_gap" in next(w for w in result.warnings if "free-running" in w)
    worst = frame["free_sqnr_db"].min()
    assert parse_threshold(f"free_sqnr_db>={worst - 1}").check(result.end_to_end).passed
    assert not parse_threshold(f"free_sqnr_db>={worst + 1}").check(result.end_to_end).passed
    # thresholds: known in sequence mode only, and a set without [sequence] says why not
    parse_threshold("free_sqnr_db>=20", known_metrics=known_metrics(model, False, seq))
    parse_threshold("free_element_match>=95", known_metrics=known_metrics(model, False, seq))  # prob: a Sigmoid's
    with pytest.raises(ThresholdError, match=r"free-running figure.*\[sequence\]"):
        parse_threshold("free_sqnr_db>=20", known_metrics=known_metrics(model, False, plain))
    # the search's evaluations measure them when its threshold names one
    found = search(model, table, seq, SearchOptions(threshold="free_sqnr_db>=0", batch_size=1, probe_samples=2))
    assert found.met and "free_sqnr_db" in found.comparison.end_to_end.columns
    # ... and a ranking runs whole streams: the first samples, said as such (it said "the samples the all-INT8
    # model gets worst", which it did not use)
    ranked = search(model, table, seq, SearchOptions(threshold="free_sqnr_db>=200", batch_size=1,  # INT8 misses
                                                     probe_samples=2, budget=2))
    subset_notes = [n for n in ranked.notes if n.startswith("ranking subset")]
    assert subset_notes == ["ranking subset: the first 2 validation samples (a free-running threshold runs each "
                            "stream from its start)"]


def test_a_search_in_sequence_mode_measures_its_final_plan_free_running(tmp_path):
    """The verdict judges teacher-forced figures; the final plan is what a user deploys, so the search also runs
    it over the streams on its own state and says so beside its teacher-forced SQNR."""
    from quantlab.search import SearchOptions, search

    model, seq, _ = _sequence_and_plain_sets(tmp_path)
    table = calibrate(model, seq, "minmax", batch_size=1).tables["minmax"]
    result = search(model, table, seq, SearchOptions(threshold="sqnr_db>=0", batch_size=1, probe_samples=2))
    (note,) = [n for n in result.notes if n.startswith("sequence mode, free-running")]
    assert f"{result.comparison.end_to_end['candidate'].iloc[0]}: prob" in note and "teacher-forced" in note


def test_an_lstm_whose_time_axis_holds_the_batch_couples_it():
    """Silero VAD v6 (faster_whisper) reads ``input [seq_len, 576]`` and runs its LSTM along seq_len: a batch of 8
    chunks there is 8 time steps of one stream (the cell state's range 1.00 at batch 1, 7.33 at 8), and nothing
    said so. An LSTM over the batch axis couples; one whose batch is axis 1 of ``[T, N, C]`` (or 0 with
    ``layout = 1``) does not."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.graph.samples import sample_mixing_nodes

    hidden, features = 4, 3
    rng = np.random.default_rng(0)

    def lstm_model(x_shape: list, layout: int = 0, transpose: bool = False) -> onnx.ModelProto:
        weights = [numpy_helper.from_array(rng.normal(0, 0.3, (1, 4 * hidden, features)).astype(np.float32), "W"),
                   numpy_helper.from_array(rng.normal(0, 0.3, (1, 4 * hidden, hidden)).astype(np.float32), "R")]
        nodes = [helper.make_node("Unsqueeze", ["x", "one"], ["seq"], name="add_stream_axis")] if transpose else []
        nodes.append(helper.make_node("LSTM", ["seq" if transpose else "x", "W", "R"], ["y"], name="lstm",
                                      hidden_size=hidden, layout=layout))
        graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)],
                                  [*weights, numpy_helper.from_array(np.array([1], np.int64), "one")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    assert sample_mixing_nodes(model_from_proto(lstm_model(["seq_len", features], transpose=True)), {}) == ["lstm"]
    assert sample_mixing_nodes(model_from_proto(lstm_model(["T", "N", features])), {"x": 1}) == []
    assert sample_mixing_nodes(model_from_proto(lstm_model(["N", "T", features], layout=1)), {}) == []
    assert sample_mixing_nodes(model_from_proto(lstm_model(["N", "T", features], layout=1)), {"x": 1}) == ["lstm"]


def test_a_manifests_stream_count_sets_the_batch_and_refuses_another(tmp_path, capsys):
    """4 streams interleaved, calibrated at the default batch of 8: a T5 decoder's step 1 got the empty cache and
    step 2 step 0's, without a word. `[sequence] streams = N` says how many; every command runs at that batch
    and another batch size is refused, naming the key."""
    from quantlab.cli import main

    _npz_folder(tmp_path)
    (tmp_path / "seq.toml").write_text(MANIFEST.format(axis=1) + '[sequence]\ncarry = { stateN = "state" }\n'
                                       'streams = 2\n')
    onnx.save(_vad(), tmp_path / "vad.onnx")
    data = open_dataset(tmp_path / "seq.toml")
    assert data.sequence_streams == 2
    model = model_from_proto(_vad(), label="vad")
    with pytest.raises(InputMismatchError, match=r"interleave 2 streams \(\[sequence\] streams = 2\).*--batch-size 2"):
        calibrate(model, data, "minmax", batch_size=1)
    at_two = calibrate(model, data, "minmax", batch_size=2).tables["minmax"]
    assert main(["calibrate", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "seq.toml"), "--method",
                 "minmax", "--no-progress", "--out", str(tmp_path / "cal")]) == 0
    assert "interleaves 2 streams ([sequence] streams): batch size 2" in capsys.readouterr().err
    from quantlab.table import read_table

    assert read_table(tmp_path / "cal" / "calib_minmax.json").ranges == at_two.ranges
    assert main(["calibrate", str(tmp_path / "vad.onnx"), "--calib", str(tmp_path / "seq.toml"), "--method",
                 "minmax", "--no-progress", "--batch-size", "4", "--out", str(tmp_path / "c4")]) == 2
    # perf --data on a sequence: its first batch holds the first step's state, and it says so
    assert main(["perf", str(tmp_path / "vad.onnx"), "--backend", "ort", "--data", str(tmp_path / "seq.toml"),
                 "--iterations", "2", "--warmup", "0", "--batch-size", "2"]) == 0
    assert "is a sequence ([sequence] carry): its first batch is timed with the state" in capsys.readouterr().err
    assert main(["perf", str(tmp_path / "vad.onnx"), "--backend", "ort", "--data", str(tmp_path / "seq.toml"),
                 "--iterations", "2", "--warmup", "0", "--json", str(tmp_path / "p.json")]) == 0
    assert "interleaves 2 streams ([sequence] streams): batch size 2" in capsys.readouterr().err  # not batch 1
    assert json.loads((tmp_path / "p.json").read_text())["results"][0]["latency"]["batch_size"] == 2
    (tmp_path / "bad.toml").write_text(MANIFEST.format(axis=1) + '[sequence]\ncarry = { stateN = "state" }\n'
                                       'streams = 0\n')
    with pytest.raises(ManifestError, match=r"streams.*a positive integer"):
        open_dataset(tmp_path / "bad.toml")


def test_sequence_mode_does_not_call_every_streams_first_step_alike_a_dead_model():
    """The first batch of a sequence set holds every stream's first step: streams that start alike (a decoder's
    BOS, silence) give the same outputs, rightly. The check for outputs alike for every sample skips sequence mode;
    the same batch as plain samples is named."""
    from quantlab.compare import CompareOptions, compare
    from quantlab.sequence import SequenceData

    arrays = _arrays(6)
    arrays["input"] = np.repeat(arrays["input"][:1], 6, axis=0)  # one chunk, six times
    arrays["state"] = np.zeros_like(arrays["state"])
    model = model_from_proto(_vad(), label="vad")
    options = CompareOptions(batch_size=3, per_layer=False, bootstrap=0)
    plain = from_arrays(arrays, batch_axes=AXES, role="validation")
    alike = "the same values for every sample"
    assert any(alike in w for w in compare(model, {"same": model}, plain, options).warnings)
    streams = SequenceData(plain, model, {"stateN": "state"})
    assert not any(alike in w for w in compare(model, {"same": model}, streams, options).warnings)


def test_a_padded_set_is_summarised_as_its_samples_whatever_the_batch(tmp_path):
    """A [pad] set was fingerprinted in its padded, batch-dependent form: its content hash changed with the batch
    size, 2 of 10 samples shared with the calibration set were found (10 at batch 1), and the size warnings read
    the batches' padded lengths (24-25 for sentences of 7-25). Each sample is read as it was before padding."""
    from quantlab.data import summarize

    _sequences(tmp_path, [5, 8, 3, 6])
    (tmp_path / "p.toml").write_text(PADDED + 'inputs = ["x"]\nvalue = -7.0\nmask = "mask"\n')
    data = open_dataset(tmp_path / "p.toml")
    summaries = [summarize(data, batch) for batch in (1, 2, 4)]
    assert len({s.sha256 for s in summaries}) == 1 and len({s.sample_hashes for s in summaries}) == 1
    x = next(i for i in summaries[2].inputs if i.name == "x")
    assert (x.shape_min[0], x.shape_max[0]) == (3, 8) and x.min > -7.0  # own lengths; no padding value
    mask = next(i for i in summaries[2].inputs if i.name == "mask")
    assert mask.min == mask.max == 1.0  # the real positions only


@pytest.mark.parametrize("one_input_concat", [False, True])
def test_a_caches_copy_of_its_past_is_left_out_of_its_figures(one_input_concat):
    """``present = Concat(past, new)``: teacher-forced, every model is fed the reference's past, so the first
    positions hold no error and diluted that of the new one (Whisper's INT8 decoder: 36.0 dB on ``present_k0``
    teacher-forced, 31.4 free-running). The figures measure the new positions: the SQNR of the last position of
    each step, pooled, run here with ONNX Runtime directly; the comparison says so. Free-running too (a Llama's
    present read 46 dB over its whole cache, 40 over its new positions), and through torch's one-input Concat."""
    import quantlab as ql
    from quantlab.sequence import SequenceData

    model = model_from_proto(models.kv_cache_step(one_input_concat=one_input_concat), label="kv")
    rng = np.random.default_rng(1)
    steps = 6
    arrays = {"x": rng.normal(size=(steps, 1, 8)).astype(np.float32), "past": np.zeros((steps, 0, 8), np.float32)}
    seq = SequenceData(from_arrays(arrays, role="validation"), model, {"present": "past"})
    table = calibrate(model, seq, "minmax", batch_size=1).tables["minmax"]
    int8 = ql.write_model(model, ql.uniform_plan("int8"), table, ql.WriteOptions(target="ort"))
    result = ql.compare(model, {"int8": int8}, seq, ql.CompareOptions(batch_size=1, per_layer=False, bootstrap=0))
    sessions = [models.ort_session(p) for p in (model.proto, int8.proto)]
    past, signal, noise = arrays["past"][:1], 0.0, 0.0
    for i in range(steps):
        ref, cand = (s.run(["present"], {"x": arrays["x"][i:i + 1], "past": past})[0] for s in sessions)
        signal += float((ref[:, -1].astype(np.float64) ** 2).sum())
        noise += float(((ref - cand)[:, -1].astype(np.float64) ** 2).sum())
        np.testing.assert_array_equal(ref[:, :-1], cand[:, :-1])  # the copy: no error
        past = ref
    row = result.end_to_end.set_index("output").loc["present"]
    assert row["sqnr_db"] == pytest.approx(10 * np.log10(signal / noise), abs=0.05)
    assert sum("copy an input every model is fed alike" in w for w in result.warnings) == 1
    pasts, signal, noise = {0: arrays["past"][:1], 1: arrays["past"][:1]}, 0.0, 0.0  # free-running: own caches
    for i in range(steps):
        ref, cand = (s.run(["present"], {"x": arrays["x"][i:i + 1], "past": pasts[k]})[0]
                     for k, s in enumerate(sessions))
        signal += float((ref[:, -1].astype(np.float64) ** 2).sum())
        noise += float(((ref - cand)[:, -1].astype(np.float64) ** 2).sum())
        pasts = {0: ref, 1: cand}
    free = next(r for r in result.settings["free_running"] if r["output"] == "present")
    assert free["sqnr_db"] == pytest.approx(10 * np.log10(signal / noise), abs=0.05)


def _batchless_classifier() -> onnx.ModelProto:
    """x[16] (no batch axis) -> MatMul[16, 10] -> Add -> Softmax -> probs[10]: a model exported for one sample."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(4)
    inits = [numpy_helper.from_array(rng.normal(0, 1, (16, 10)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 0.1, 10).astype(np.float32), "b")]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"), helper.make_node("Add", ["h", "b"], ["z"]),
             helper.make_node("Softmax", ["z"], ["probs"], name="softmax", axis=-1)]
    graph = helper.make_graph(nodes, "batchless", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [16])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [10])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_batchless_classifiers_class_scores_give_top1_agreement(tmp_path):
    """probs[10] of a model without batch axis is one sample's class scores: top-1 agreement is figured as for
    [N, 10], from the samples a manifest feeds one at a time."""
    from quantlab.compare import CompareOptions, compare
    from quantlab.compare.labels import classifier_outputs
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model
    model = model_from_proto(_batchless_classifier())
    assert classifier_outputs(model) == {"probs": 10}
    folder = tmp_path / "samples"
    folder.mkdir()
    for i, x in enumerate(np.random.default_rng(5).normal(0, 1, (12, 16)).astype(np.float32)):
        np.savez(folder / f"s{i:02d}.npz", x=x)
    (tmp_path / "set.toml").write_text('shuffle = false\n[source]\nkind = "npz"\npath = "samples"\n'
                                       '[inputs]\nx = { field = "x", batch_axis = "none" }\n')
    data = open_dataset(tmp_path / "set.toml")
    table = calibrate(model, data, "minmax", batch_size=1).tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    result = compare(model, {"int8": int8, "same": model}, data, CompareOptions(batch_size=1, per_layer=False,
                                                                               bootstrap=0))
    rows = result.end_to_end.set_index("candidate")
    assert (rows["samples"] == 12).all() and rows.loc["same", "top1_agreement"] == 100.0
    assert 0.0 < rows.loc["int8", "top1_agreement"] <= 100.0


@pytest.mark.parametrize("chunk, shared", [(0, True), (2, False)])
def test_compare_calib_hashes_a_sequence_set_with_the_state_its_streams_carry(tmp_path, capsys, chunk, shared):
    """A validation stream whose first step is calibration chunk 2's input was called a shared sample: the
    --calib manifest was hashed with each file's own state, the validation set with the state it carries (at its
    first step, its own). Calibration fed chunk 2 the state chunk 1 left, so it is another sample; chunk 0, a
    first step in both, is the same one."""
    import shutil

    from quantlab.cli import main

    _npz_folder(tmp_path)
    (tmp_path / "seq.toml").write_text(MANIFEST.format(axis=1) + '[sequence]\ncarry = { stateN = "state" }\n')
    (tmp_path / "val").mkdir()
    shutil.copy(tmp_path / "chunks" / f"chunk{chunk}.npz", tmp_path / "val" / "first.npz")
    (tmp_path / "val.toml").write_text('role = "validation"\n' + MANIFEST.format(axis=1).replace('"chunks"', '"val"')
                                       + '[sequence]\ncarry = { stateN = "state" }\n')
    onnx.save(_vad(), tmp_path / "vad.onnx")
    code = main(["compare", str(tmp_path / "vad.onnx"), str(tmp_path / "vad.onnx"), "--data",
                 str(tmp_path / "val.toml"), "--calib", str(tmp_path / "seq.toml"), "--batch-size", "1",
                 "--no-per-layer", "--no-progress", "--out", str(tmp_path / "cmp")])
    assert code == 0
    captured = capsys.readouterr()
    assert ("shares 1 sample(s)" in captured.out + captured.err) == shared


def _sequence_first() -> onnx.ModelProto:
    """``x[T, batch, 8]`` (a torch ``batch_first=False`` export) -> MatMul -> mean over time -> ``y[batch, 4]``."""
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("ReduceMean", ["h"], ["y"], name="mean", axes=[0], keepdims=0)]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "batch", 8])
    graph = helper.make_graph(nodes, "seq_first", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializer=[w])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_sequence_first_input_is_not_stacked_on_its_time_axis(tmp_path, capsys):
    """The default axis 0 is time here: the batch symbol would take the steps and ONNX Runtime fail in a Reshape."""
    model = model_from_proto(_sequence_first(), label="seq.onnx")
    steps = np.random.default_rng(1).normal(size=(6, 5, 8)).astype(np.float32)  # 6 samples of [5 steps, 8]
    with pytest.raises(InputMismatchError, match=r"input 'x'.*batch on axis 1 \('batch'\).*batch_axes=\{'x': 1\}"):
        check_inputs(from_arrays({"x": steps}), model, batch_size=2)
    folder = tmp_path / "seq"
    folder.mkdir()
    for i, s in enumerate(steps):
        np.save(folder / f"s{i}.npy", s)
    (tmp_path / "seq.toml").write_text('[source]\nkind = "npy"\npath = "seq"\n[inputs]\nx = "array"\n')
    manifest_error = r"seq.toml stacks samples on axis 0 \('T' in the model\).*batch_axis = 1"
    with pytest.raises(InputMismatchError, match=manifest_error):
        check_inputs(open_dataset(tmp_path / "seq.toml"), model, batch_size=2)
    # the command says that one thing: not first a batch-coupling note read off the wrong axis ('mean' over time)
    onnx.save(_sequence_first(), tmp_path / "seq.onnx")
    code = cli_main(["calibrate", str(tmp_path / "seq.onnx"), "--calib", str(tmp_path / "seq.toml"),
                     "--out", str(tmp_path / "out"), "--no-progress"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and re.search(manifest_error, err[0]), err
    assert not (tmp_path / "out").exists()
    data = from_arrays({"x": np.ascontiguousarray(steps.transpose(1, 0, 2))}, batch_axes={"x": 1})
    check_inputs(data, model, batch_size=4)
    four, one = (calibrate(model, data, "minmax", batch_size=b) for b in (4, 1))
    assert four.tables["minmax"].ranges["h"] == one.tables["minmax"].ranges["h"]
