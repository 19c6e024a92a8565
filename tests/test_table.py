"""Calibration tables: JSON round trip, TensorRT cache export/import, fit check, clear errors."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest

import models
from quantlab.errors import CalibrationError
from quantlab.graph import model_from_proto
from quantlab.table import CalibrationTable, TensorRange, check_table_fits, read_table, table_to_dict, write_table
from quantlab.trt_cache import parse_trt_cache, read_trt_cache, trt_cache_text, trt_version_number, write_trt_cache


def _table(model_sha256: str = "ab" * 32) -> CalibrationTable:
    return CalibrationTable(
        method="entropy",
        ranges={
            "input": TensorRange(amax=2.5, min=-2.4, max=2.5, clipped_fraction=0.0,
                                 excluded={"nonfinite": 0, "huge": 0}, histogram={"count": 10}),
            "relu1": TensorRange(amax=0.1234567, min=0.0, max=0.3, clipped_fraction=0.01,
                                 excluded={"nonfinite": 0, "huge": 3}),
            "masked:0": TensorRange(amax=0.0, min=0.0, max=0.0),
        },
        model_sha256=model_sha256,
        settings={"bins": 2048},
        calib_set={"sha256": "cd" * 32, "count": 10},
        versions={"numpy": np.__version__},
        notes=("a note",),
    )


def test_json_round_trip_is_exact_and_deterministic(tmp_path):
    table = _table()
    a = write_table(table, tmp_path / "a.json")
    b = write_table(read_table(a), tmp_path / "b.json")
    assert a.read_bytes() == b.read_bytes()
    back = read_table(b)
    assert back == table
    doc = json.loads(a.read_text())
    assert doc["tensors"]["relu1"]["scale"] == float(np.float32(0.1234567 / 127))


@pytest.mark.parametrize(
    "content, match",
    [
        ("{not json", "not valid JSON"),
        ('{"format": "onnxruntime"}', "not a quantlab calibration table"),
        ("TRT-8601-EntropyCalibration2\nx: 3c010a14\n", "TensorRT calibration cache"),
        ('{"format": "quantlab.calibration/1", "method": "entropy", "model_sha256": "x", "tensors": {"t": {"amax": -1}}}',
         "tensor 't': amax must be >= 0"),
        ('{"format": "quantlab.calibration/1", "method": "entropy", "model_sha256": "x", "tensors": {"t": {"amax": "1"}}}',
         "amax must be a finite number"),
        ('{"format": "quantlab.calibration/1", "method": "entropy", "tensors": {}}', "'model_sha256'"),
    ],
)
def test_read_table_rejects_malformed_files(tmp_path, content, match):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(CalibrationError, match=match) as err:
        read_table(path)
    assert "bad.json" in str(err.value)


def test_read_table_missing_file(tmp_path):
    with pytest.raises(CalibrationError, match="quantlab calibrate"):
        read_table(tmp_path / "nope.json")


def test_trt_cache_round_trip_keeps_float32_scales(tmp_path):
    table = _table()
    path = write_trt_cache(table, tmp_path / "calibration.cache", version="10.13.0")
    text = path.read_text()
    lines = text.splitlines()
    assert lines[0] == "TRT-101300-EntropyCalibration2"
    assert lines[1] == "input: " + struct.pack(">f", 2.5 / 127).hex()
    back = read_trt_cache(path, model_sha256=table.model_sha256)
    assert list(back.ranges) == list(table.ranges)  # names with ':' survive
    for name, r in table.ranges.items():
        assert np.float32(back.ranges[name].scale) == np.float32(r.scale), name
    assert back.settings["trt_version"] == "101300" and back.settings["calibrator"] == "EntropyCalibration2"
    assert back.model_sha256 == table.model_sha256


def test_import_a_cache_written_by_hand_in_tensorrt_format():
    """As TensorRT 8.4 / Polygraphy write them: CRLF allowed, 'Unnamed Layer' names, '0' for unused tensors."""
    text = (
        "TRT-8401-EntropyCalibration2\r\n"
        "input: 3caa54fc\r\n"
        "(Unnamed Layer* 64) [Shuffle]_output: 0\r\n"
        "395: 3cbe52af\r\n"
        "conv1_relu: 3d8f5c29\r\n"
    )
    table = parse_trt_cache(text)
    assert set(table.ranges) == {"input", "(Unnamed Layer* 64) [Shuffle]_output", "395", "conv1_relu"}
    scale = struct.unpack(">f", bytes.fromhex("3d8f5c29"))[0]  # 0.07
    assert table.ranges["conv1_relu"].amax == pytest.approx(0.07 * 127, rel=1e-6)
    assert table.ranges["conv1_relu"].scale == pytest.approx(scale, rel=1e-12)
    assert table.ranges["(Unnamed Layer* 64) [Shuffle]_output"].amax == 0.0
    assert table.method == "imported" and table.settings["trt_version"] == "8401"
    assert parse_trt_cache("TRT-7103-MinMaxCalibration\ndata_0: 4000889d").settings["calibrator"] == "MinMaxCalibration"


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "empty"),
        ("input: 3caa54fc\n", "header"),
        ("TRT-8401-EntropyCalibration2\ninput 3caa54fc\n", "line 2"),
        ("TRT-8401-EntropyCalibration2\ninput: xyz\n", "line 2"),
        ("TRT-8401-EntropyCalibration2\na: 3caa54fc\na: 3caa54fc\n", "appears twice"),
        ("TRT-8401-EntropyCalibration2\na: 7fc00000\n", "scale nan"),
        ("TRT-8401-EntropyCalibration2\na: bf800000\n", "scale -1.0"),
    ],
)
def test_bad_caches_are_refused_with_the_line(text, match):
    with pytest.raises(CalibrationError, match=match):
        parse_trt_cache(text, where="my.cache")


def test_read_trt_cache_binary_and_missing(tmp_path):
    path = tmp_path / "engine.cache"
    path.write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(CalibrationError, match="binary"):
        read_trt_cache(path)
    with pytest.raises(CalibrationError, match="no such"):
        read_trt_cache(tmp_path / "missing.cache")


def test_trt_version_numbers():
    assert trt_version_number("10.13.0") == "101300"
    assert trt_version_number("8.6.1") == "8601"
    assert trt_version_number("101401") == "101401"
    with pytest.raises(CalibrationError, match="version"):
        trt_version_number("ten")
    with pytest.raises(CalibrationError, match="line break"):
        trt_cache_text(CalibrationTable("minmax", {"a\nb": TensorRange(1.0, -1.0, 1.0)}, ""))


def test_check_table_fits_names_both_hashes():
    model = model_from_proto(models.conv_net())
    check_table_fits(_table(model.sha256), model)
    with pytest.raises(CalibrationError, match="ababababab") as err:
        check_table_fits(_table("ab" * 32), model)
    assert model.sha256[:12] in str(err.value)
    # an imported cache has no hash: it must at least name tensors of this model
    check_table_fits(_table(""), model)
    stranger = CalibrationTable("imported", {"foo": TensorRange(1.0, -1.0, 1.0)}, "")
    with pytest.raises(CalibrationError, match="another model"):
        check_table_fits(stranger, model)


def test_an_all_zero_tensor_gets_scale_one_and_a_warning_naming_it_when_read(tmp_path):
    """amax 0 is legal (all zero in calibration); its Q/DQ scale is 1.0, positive and exact in float16."""
    from quantlab.quantize import activation_qparams
    from quantlab.table import ZERO_RANGE_SCALE, ZeroRangeWarning

    table = _table()
    assert table.ranges["masked:0"].scale == ZERO_RANGE_SCALE == 1.0
    qp = activation_qparams(table.ranges["masked:0"], "tensorrt")
    assert qp.scale == np.float32(1.0) and np.float16(qp.scale) == 1.0
    path = write_table(table, tmp_path / "t.json")
    assert json.loads(path.read_text())["tensors"]["masked:0"]["scale"] == 1.0
    with pytest.warns(ZeroRangeWarning, match=r"t\.json: 1 tensor\(s\) have amax 0.*'masked:0'"):
        back = read_table(path)
    assert back.ranges["masked:0"].amax == 0.0
    # TensorRT's own encoding of a zero range in a cache is "0": it reads back as amax 0, not 127
    cache = write_trt_cache(table, tmp_path / "c.cache")
    assert "masked:0: 0\n" in cache.read_text()
    with pytest.warns(ZeroRangeWarning, match="'masked:0'"):
        assert read_trt_cache(cache).ranges["masked:0"].amax == 0.0


def test_an_additive_mask_of_zeros_and_float32_min_reads_back_without_a_zero_range_warning(tmp_path):
    """A mask's only non-zero values are huge sentinels: amax 0, said in the table's notes and refused by the
    writer; a warning on every read (once per method, in every run of a transformer) would only be noise."""
    import warnings

    from quantlab.table import ZeroRangeWarning

    table = _table()
    ranges = dict(table.ranges)
    ranges["mask"] = TensorRange(amax=0.0, min=0.0, max=0.0, excluded={"nonfinite": 0, "huge": 96})
    path = write_table(CalibrationTable("minmax", ranges, table.model_sha256), tmp_path / "mask.json")
    with pytest.warns(ZeroRangeWarning) as caught:
        back = read_table(path)
    assert back.ranges["mask"].amax == 0.0
    assert len(caught) == 1 and "'masked:0'" in str(caught[0].message) and "'mask'" not in str(caught[0].message)
    del ranges["masked:0"]
    path = write_table(CalibrationTable("minmax", ranges, table.model_sha256), tmp_path / "only_mask.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroRangeWarning)
        read_table(path)


@pytest.mark.parametrize("amax", [1e-45, 1e-40, 1.4e-36, 1e300])
def test_an_amax_whose_scale_leaves_float32_normals_is_an_error_naming_the_tensor(tmp_path, amax):
    doc = table_to_dict(_table())
    doc["tensors"]["relu1"].update(amax=amax, min=-amax, max=amax)
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(CalibrationError) as err:
        read_table(path)
    assert "tiny.json" in str(err.value) and "tensor 'relu1'" in str(err.value) and "float32" in str(err.value)
    with pytest.raises(CalibrationError, match="tensor 'relu1'"):
        CalibrationTable("minmax", {"relu1": TensorRange(amax, -amax, amax)}, "")


def test_the_smallest_amax_with_a_normal_scale_is_accepted():
    tiny = float(np.finfo(np.float32).tiny)
    r = TensorRange(127 * tiny, -127 * tiny, 127 * tiny)
    CalibrationTable("minmax", {"t": r}, "")
    assert np.float32(r.scale) == np.float32(tiny)


def test_a_cache_with_a_denormal_scale_is_refused_with_the_line():
    with pytest.raises(CalibrationError, match=r"my\.cache: line 3: tensor 'b'"):
        parse_trt_cache("TRT-8601-EntropyCalibration2\na: 3c010a14\nb: 00000001\n", where="my.cache")


def test_min_above_max_is_refused_but_no_usable_value_is_not():
    with pytest.raises(CalibrationError, match="min 2.0 is above max 1.0"):
        CalibrationTable("minmax", {"t": TensorRange(1.0, 2.0, 1.0)}, "")
    CalibrationTable("minmax", {"t": TensorRange(0.0, math.inf, -math.inf)}, "")  # every value excluded


def test_an_unreadable_table_or_cache_is_a_permission_error_naming_it(tmp_path):
    table = write_table(_table(), tmp_path / "t.json")
    cache = write_trt_cache(_table(), tmp_path / "c.cache")
    for path, read in ((table, read_table), (cache, read_trt_cache)):
        path.chmod(0)
        with models.permissions_enforced(), pytest.raises(PermissionError) as err:
            read(path)
        assert err.value.filename == str(path) and f"chmod a+r {path}" in str(err.value)


def test_a_zero_filled_tensor_quantlab_calibrated_reads_back_quietly(tmp_path):
    """A BERT's zero-filled tensors (ConstantOfShape, an Expand of zeros) have amax 0 and an all-zero histogram:
    the table's notes name them when a Q/DQ reads them; reading the table warned about them on every read,
    three times a run. A zero range set by hand over a histogram that saw values still warns."""
    import warnings

    from quantlab.table import ZeroRangeWarning

    table = _table()
    ranges = dict(table.ranges)
    ranges["zeros"] = TensorRange(amax=0.0, min=0.0, max=0.0, histogram={"count": 64, "zeros": 64, "absmax": 0.0})
    del ranges["masked:0"]
    path = write_table(CalibrationTable("minmax", ranges, table.model_sha256), tmp_path / "quiet.json")
    with warnings.catch_warnings():
        warnings.simplefilter("error", ZeroRangeWarning)
        read_table(path)
    ranges["edited"] = TensorRange(amax=0.0, min=0.0, max=0.0, histogram={"count": 64, "zeros": 3, "absmax": 2.5})
    path = write_table(CalibrationTable("minmax", ranges, table.model_sha256), tmp_path / "edited.json")
    with pytest.warns(ZeroRangeWarning, match="'edited'") as caught:
        read_table(path)
    assert "'zeros'" not in str(caught[0].message)
