"""--shapes parsing and profiles derived from the shapes the data holds (quantlab.shapes)."""

from __future__ import annotations

import numpy as np
import pytest

from quantlab.errors import InputMismatchError
from quantlab.shapes import (
    ShapeLog,
    ShapeRange,
    check_range_fits,
    format_shapes,
    parse_shapes,
    profiles_from_data,
)


def test_trtexec_style_shapes_parse_for_several_inputs():
    ranges = parse_shapes("x:1x3x48x64,8x3x48x320,32x3x48x1600 mask:1x16,8x16,32x16")
    assert ranges["x"] == ShapeRange("x", (1, 3, 48, 64), (8, 3, 48, 320), (32, 3, 48, 1600))
    assert ranges["mask"].opt == (8, 16)
    # comma-separated inputs, a repeated flag, a name holding ':' and a single fixed shape
    again = parse_shapes(["x:1x3x48x64,8x3x48x320,32x3x48x1600,input:0:2x5", "y:4"])
    assert again["x"] == ranges["x"]
    assert again["input:0"] == ShapeRange("input:0", (2, 5), (2, 5), (2, 5))
    assert again["y"].max == (4,)
    assert parse_shapes(format_shapes(ranges)) == ranges


@pytest.mark.parametrize("text, says", [
    ("x:1x3,2x3", "'x' has 2 shapes"),
    ("x:1x3,2x3,3x3,4x3", "'x' has 4 shapes"),
    ("x:1x3,8x3,4x3", "axis 0: MIN 1, OPT 8, MAX 4"),
    ("x:1x3,8x3x2,9x3", "ranks 2, 3 and 2"),
    ("x:1x3,8*3,9x3", "OPT shape '8\\*3' of input 'x'"),
    ("1x3,8x3,9x3", "before any input name"),
    (":1x3", "no input name"),
    ("x:-1x3,1x3,1x3", "MIN shape '-1x3' of input 'x'"),
    ("x:1,2,3 x:1,2,3", "given twice"),
    ("  ", "empty"),
])
def test_bad_shapes_name_the_input_and_say_what_to_write(text, says):
    with pytest.raises(InputMismatchError, match=says) as err:
        parse_shapes(text)
    assert "NAME:MIN,OPT,MAX" in str(err.value)


def test_an_empty_axis_is_a_range_tensorrt_builds():
    """A decoder's first step has a past of length 0: the data's shapes give MIN 0 (even MAX 0 for a no-cache
    set), which was refused though TensorRT builds empty tensors."""
    ranges = parse_shapes("past:1x4x0x16,8x4x0x16,8x4x6x16 x:1x1,1x1,1x1")
    assert ranges["past"].min == (1, 4, 0, 16) and ranges["past"].max == (8, 4, 6, 16)
    assert ShapeRange("past", (1, 0), (1, 0), (1, 0)).max == (1, 0)


def test_range_must_keep_the_models_rank_and_fixed_dims():
    r = parse_shapes("x:1x3x48x64,8x3x48x320,32x3x48x1600")["x"]
    check_range_fits(r, (-1, 3, 48, -1))
    with pytest.raises(InputMismatchError, match="axis 2 .* fixes it to 32; write 32"):
        check_range_fits(r, (-1, 3, 32, -1))
    with pytest.raises(InputMismatchError, match="rank 4 .*rank 3"):
        check_range_fits(r, (-1, 3, -1))


def test_profiles_follow_the_data_and_never_invent_a_width_of_1():
    log = ShapeLog()
    for batch, width in [(8, 320), (8, 320), (8, 160), (3, 640)]:  # the last batch is partial
        log.observe({"image": np.zeros((batch, 3, 48, width), np.float32), "fixed": np.zeros((batch, 4))})
    ranges = profiles_from_data({"image": (-1, 3, 48, -1), "fixed": (2, 4)}, log)
    assert set(ranges) == {"image"}  # a fully static input needs no profile
    image = ranges["image"]
    assert image.min == (1, 3, 48, 160)  # batch down to 1 (partial batches); width only what the data had
    assert image.opt == (8, 3, 48, 320)  # the most frequent value per axis
    assert image.max == (8, 3, 48, 640)
    assert log.as_dict()["image"][0] == [8, 3, 48, 320, 2]
    again = ShapeLog.from_dict(log.as_dict())  # what a calibration table can keep for `quantlab build`
    assert profiles_from_data({"image": (-1, 3, 48, -1)}, again) == ranges
    with pytest.raises(InputMismatchError, match="calib.json: input 'image'"):
        ShapeLog.from_dict({"image": [[8, -3, 2]]}, where="calib.json")


def test_data_shapes_that_break_the_model_are_named():
    log = ShapeLog()
    log.observe({"image": np.zeros((2, 3, 32, 64), np.float32)})
    with pytest.raises(InputMismatchError, match="'image'.*axis 2"):
        profiles_from_data({"image": (-1, 3, 48, -1)}, log)


EXPERIMENT = """\
name = "ocr"
backend = "{backend}"

[model]
path = "model.onnx"
shapes = "{shapes}"

[data]
calibration = "calib.toml"
validation = "val.toml"
"""


def test_experiment_files_take_shapes_and_name_the_line_of_a_bad_one(tmp_path):
    from quantlab.errors import ExperimentError
    from quantlab.experiment import load_experiment

    for name in ("model.onnx", "calib.toml", "val.toml"):
        (tmp_path / name).write_text("x")
    good = tmp_path / "good.toml"
    good.write_text(EXPERIMENT.format(shapes="image:1x3x48x64,8x3x48x320,32x3x48x1600", backend="tensorrt-rtx"))
    config = load_experiment(good)
    assert parse_shapes(config.shapes)["image"].max == (32, 3, 48, 1600)
    assert config.settings()["shapes"] == config.shapes
    bad = tmp_path / "bad.toml"
    bad.write_text(EXPERIMENT.format(shapes="image:1x3x48x64,8x3x48x320", backend="tensorrt-rtx"))
    with pytest.raises(ExperimentError) as err:
        load_experiment(bad)
    text = str(err.value)
    assert "bad.toml: line 6" in text and "'image' has 2 shapes" in text and "NAME:MIN,OPT,MAX" in text
    bad.write_text(EXPERIMENT.format(shapes="image:1x3x48x64", backend="ort"))  # ONNX Runtime takes any shape
    with pytest.raises(ExperimentError, match=r"bad.toml: line 6: \[model\] key 'shapes'.*ONNX Runtime runs any shape"):
        load_experiment(bad)


def test_a_build_takes_the_flag_else_the_recorded_data_shapes_else_nothing():
    from quantlab.shapes import shapes_for_build

    net = {"image": (-1, 3, 48, -1)}
    recorded = {"image": [[8, 3, 48, 320, 5], [2, 3, 48, 96, 1]]}
    flag = shapes_for_build("image:1x3x48x64,8x3x48x320,32x3x48x1600", recorded, net)
    assert flag["image"].max == (32, 3, 48, 1600)
    assert shapes_for_build(None, recorded, net)["image"].as_lists() == [[1, 3, 48, 96], [8, 3, 48, 320],
                                                                        [8, 3, 48, 320]]
    assert shapes_for_build(None, None, net) is None


def test_sample_shapes_do_not_depend_on_the_batch_size_and_the_batch_axis_is_set_apart():
    """What a calibration table keeps: sample shapes (batch axis 1, counted per sample), on each input's axis. A
    ``[sequence]`` set's declared stream count is the batch every command runs it at: the engine's too."""
    from quantlab.shapes import PROFILE_BATCH, shapes_for_table

    logs = []
    for batch in (1, 2, 4):
        log = ShapeLog()
        for start in range(0, 4, batch):
            n = min(batch, 4 - start)
            log.observe_samples({"input": np.zeros((n, 64)), "state": np.zeros((2, n, 128)), "sr": np.zeros(())},
                                {"state": 1, "sr": None})
        logs.append(log.as_dict())
    assert logs[0]["input"] == [[1, 64, 4]] and logs[0]["state"] == [[2, 1, 128, 4]]
    assert logs[0] == logs[1] == logs[2] and logs[0]["sr"] == [[4]]  # sr (no batch axis): once per sample
    net = {"input": (-1, 64), "state": (2, -1, 128), "sr": ()}
    calib_set = {"input_shapes": logs[1], "batch_axes": {"input": 0, "state": 1, "sr": None}}
    ranges = shapes_for_table(None, calib_set, net)
    assert ranges["state"].as_lists() == [[2, 1, 128], [2, PROFILE_BATCH, 128], [2, PROFILE_BATCH, 128]]
    assert shapes_for_table(None, calib_set, net, batch=3)["input"].as_lists() == [[1, 64], [3, 64], [3, 64]]
    assert set(ranges) == {"input", "state"}  # sr is static
    fixed = shapes_for_table(None, {"input_shapes": {"image": [[1, 3, 48, 96, 5]]}}, {"image": (4, 3, 48, -1)})
    assert fixed["image"].as_lists() == [[4, 3, 48, 96]] * 3  # a fixed batch stays the model's
    with pytest.raises(InputMismatchError, match="t.json: calib_set.batch_axes: is"):
        shapes_for_table(None, {"batch_axes": {"state": "one"}}, net, where="t.json")
    streams = {**calib_set, "manifest": {"settings": {"sequence": {"carry": {"stateN": "state"}, "streams": 4}}}}
    assert shapes_for_table(None, streams, net)["state"].as_lists() == [[2, 1, 128], [2, 4, 128], [2, 4, 128]]


def test_a_profile_from_data_says_which_dynamic_sizes_its_engine_refuses():
    """A decoder step's past calibrated from length 4 up: its engine refused steps 1-3 without a word at build.
    Axes whose data reached 0 or 1 (the batch, a past of length 0) and static axes are not named."""
    from quantlab.shapes import ShapeRange, data_profile_note

    net = {"past": [-1, 4, -1, 8], "ids": [-1, 1], "image": [-1, 3, 48, -1]}
    ranges = {"past": ShapeRange("past", (1, 4, 4, 8), (8, 4, 9, 8), (8, 4, 16, 8)),
              "ids": ShapeRange("ids", (1, 1), (8, 1), (8, 1)),
              "image": ShapeRange("image", (1, 3, 48, 0), (8, 3, 48, 96), (8, 3, 48, 320))}
    note = data_profile_note(ranges, net)
    assert note is not None and ("('past' axis 2: 4 to 16 (a first step's empty cache is 0; a cache longer than 16, "
                                 "a later step, is refused)") in note
    assert "'image'" not in note and "'ids'" not in note
    assert data_profile_note({"ids": ranges["ids"]}, net) is None
    # a KV cache calibrated from length 1: the first step's empty cache (0) is refused
    kv = {"past_key_values.0.key": ShapeRange("past_key_values.0.key", (1, 2, 1, 8), (8, 2, 4, 8), (8, 2, 7, 8))}
    note = data_profile_note(kv, {"past_key_values.0.key": [-1, 2, -1, 8]})
    assert note is not None and "'past_key_values.0.key' axis 2: 1 to 7 (a first step's empty cache is 0" in note
    # fed empty too: its longest is still a limit (Whisper's decoder calibrated on 7 steps refused the 8th)
    note = data_profile_note({"past_key_values.0.key": ShapeRange("past_key_values.0.key", (1, 2, 0, 8),
                                                                  (8, 2, 4, 8), (8, 2, 7, 8))},
                             {"past_key_values.0.key": [-1, 2, -1, 8]})
    assert note is not None and "axis 2: 0 to 7 (a cache longer than 7, a later step, is refused)" in note


def test_shapes_name_inputs_whose_names_hold_spaces_or_commas():
    """build prints a profile as ``my image:1x16,8x16,8x16`` and --shapes could not read it back ("'my' comes before
    any input name"): words before a NAME:DIMS word that are no shape belong to its name."""
    from quantlab.shapes import format_shapes

    ranges = parse_shapes("my image:1x16,4x16,8x16 in/put:0:1x3 a, b:2x2,3x3,4x4")
    assert list(ranges) == ["my image", "in/put:0", "a, b"]
    assert ranges["my image"].opt == (4, 16) and ranges["a, b"].max == (4, 4)
    assert parse_shapes(format_shapes(ranges)) == ranges
    with pytest.raises(InputMismatchError, match=r"'x' comes before any input name"):
        parse_shapes("x 1x3")
    with pytest.raises(InputMismatchError, match=r"OPT shape '1xa' of input 'a' is not dims"):
        parse_shapes("a:1x3,1xa,4x3")
