from __future__ import annotations

import json

import models
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.errors import PlanError
from quantlab.plan import (
    PrecisionPlan,
    ResolvedPlan,
    Rule,
    fusion_groups,
    load_plan,
    node_names,
    plan_from_dict,
    plan_to_dict,
    resolve_plan,
    save_plan,
    uniform_plan,
)


def _groups(proto):
    return {g.name: g for g in fusion_groups(proto)}


# --------------------------------------------------------------------------- fusion groups


def test_conv_bias_relu_fuse_and_data_ops_stand_alone():
    groups = fusion_groups(models.conv_net())
    assert [g.nodes for g in groups] == [
        ("conv1", "relu1"), ("conv2", "relu2"), ("pool",), ("flatten",), ("fc",),
    ]
    assert [g.topo_index for g in groups] == list(range(5))
    by = {g.name: g for g in groups}
    assert by["conv2"].input_tensors == ("relu1",) and by["conv2"].output_tensor == "relu2"
    assert by["pool"].quantizable and by["pool"].kind == "pool"
    assert not by["flatten"].quantizable
    assert all(by[n].is_compute and by[n].quantizable for n in ("conv1", "conv2", "fc"))


def test_residual_add_fuses_into_the_conv_it_follows():
    by = _groups(models.residual_net())
    g = by["block_conv2"]
    assert g.nodes == ("block_conv2", "block_add", "block_relu2")
    assert g.residual_input == "stem_relu"
    assert g.input_tensors == ("r1", "stem_relu")
    assert g.output_tensor == "r2"
    # depthwise conv + Clip (ReLU6) is one group too
    assert by["dw_conv"].nodes == ("dw_conv", "dw_relu6")
    # the skip's producer keeps its own group and comes first
    assert by["stem_conv"].topo_index < g.topo_index


def test_concat_is_its_own_quantizable_group():
    by = _groups(models.concat_net())
    assert by["concat"].nodes == ("concat",)
    assert by["concat"].kind == "concat" and by["concat"].quantizable
    assert by["concat"].input_tensors == ("a", "b")


def _state_concat_model() -> onnx.ModelProto:
    """A recurrent step's tail: stateN = Concat(h, c) + 0 (as torch writes Silero VAD's), and a Concat a Conv reads."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.zeros(1, np.float32), "zero")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["h"], name="conv_h"),
             helper.make_node("Conv", ["x", "w"], ["c"], name="conv_c"),
             helper.make_node("Concat", ["h", "c"], ["hc"], name="state_concat", axis=0),
             helper.make_node("Add", ["hc", "zero"], ["stateN"], name="state_add"),
             helper.make_node("Concat", ["h", "c"], ["both"], name="feature_concat", axis=1),
             helper.make_node("Conv", ["both", "w8"], ["y"], name="conv_y"),
             helper.make_node("Concat", ["h", "c"], ["shown"], name="shown_concat", axis=1),
             helper.make_node("Reshape", ["shown", "shape"], ["flat"], name="reshape"),
             helper.make_node("Conv", ["shown", "w8"], ["z"], name="conv_z"),
             helper.make_node("MaxPool", ["y"], ["p"], name="last_pool", kernel_shape=[2, 2])]
    inits += [numpy_helper.from_array(np.array([1, 8, 8, 8], np.int64), "shape"),
              numpy_helper.from_array(rng.normal(0, 0.3, (4, 8, 1, 1)).astype(np.float32), "w8")]
    graph = helper.make_graph(
        nodes, "state_tail", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("stateN", "flat", "p", "z")], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_concat_and_pool_are_int8_only_where_an_int8_reader_follows():
    """Q/DQ on a Concat's inputs only rounds where nothing reads it in INT8: Silero VAD's stateN = Concat(h, c)
    + 0 had been quantized with one scale for h and c (stateN 8.8 dB instead of 21.7); and a plan file said int8
    for a Concat the writer then left float."""
    by = _groups(_state_concat_model())
    assert not by["state_concat"].quantizable  # read by an Add only
    assert by["feature_concat"].quantizable  # a Conv reads it
    assert not by["shown_concat"].quantizable  # a Conv reads it, but it is also the graph's output (reshaped)
    assert not by["last_pool"].quantizable  # the graph's output
    resolved = resolve_plan(uniform_plan("int8"), _state_concat_model())
    assert resolved.precision["state_concat"] != "int8" and resolved.precision["feature_concat"] == "int8"


def test_a_resize_read_by_a_fused_residual_add_stays_int8():
    """An FPN's top-down path: Resize(coarse) is the skip input of a conv group's residual Add, which TensorRT
    reads in INT8 (the Add is the conv's epilogue), so the Resize is an INT8 group; one only a plain Add reads
    is not."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4, 4, 1, 1)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.array([], np.float32), "no_roi")]
    nodes = [helper.make_node("Conv", ["coarse", "w"], ["c1"], name="coarse_conv"),
             helper.make_node("Resize", ["c1", "no_roi", "scales"], ["up"], name="upsample", mode="nearest"),
             helper.make_node("Conv", ["fine", "w"], ["lateral"], name="lateral_conv"),
             helper.make_node("Add", ["lateral", "up"], ["merged"], name="merge"),
             helper.make_node("Relu", ["merged"], ["y"], name="relu"),
             helper.make_node("Resize", ["c1", "no_roi", "scales"], ["up2"], name="upsample_plain", mode="nearest"),
             helper.make_node("Add", ["up2", "fine"], ["z"], name="plain_add")]
    graph = helper.make_graph(
        nodes, "fpn", [helper.make_tensor_value_info("coarse", TensorProto.FLOAT, [1, 4, 4, 4]),
                       helper.make_tensor_value_info("fine", TensorProto.FLOAT, [1, 4, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("y", "z")], inits)
    by = _groups(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert by["lateral_conv"].residual_input == "up" and by["upsample"].quantizable
    assert not by["upsample_plain"].quantizable


def test_attention_mask_add_is_not_fused_nor_quantizable():
    by = _groups(models.mlp_attention())
    assert by["qk"].nodes == ("qk",)  # a MatMul never absorbs an activation Add (mask)
    assert by["add_mask"].nodes == ("add_mask",) and not by["add_mask"].quantizable
    assert not by["softmax"].quantizable
    assert by["o_proj"].nodes == ("o_proj", "o_bias")  # constant bias Add fuses
    assert by["attn_v"].quantizable and by["attn_v"].input_tensors == ("probs", "v")


def _swish_bn_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.normal(0, .3, (4, 3, 3, 3)).astype(np.float32), "w"),
        numpy_helper.from_array(np.ones(4, np.float32), "g"),
        numpy_helper.from_array(np.zeros(4, np.float32), "b"),
        numpy_helper.from_array(np.zeros(4, np.float32), "m"),
        numpy_helper.from_array(np.ones(4, np.float32), "v"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]),  # unnamed on purpose
        helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["bn"], name="bn"),
        helper.make_node("Sigmoid", ["bn"], ["sig"], name="sig"),
        helper.make_node("Mul", ["bn", "sig"], ["y"], name="swish"),
        helper.make_node("MaxPool", ["y"], ["p"], name="maxpool", kernel_shape=[2, 2], strides=[2, 2]),
    ]
    graph = helper.make_graph(nodes, "swish", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, None)], initializer=inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_batchnorm_and_swish_fuse_and_unnamed_nodes_get_names():
    proto = _swish_bn_model()
    assert node_names(proto)[0] == "Conv_0"
    groups = fusion_groups(proto)
    assert groups[0].nodes == ("Conv_0", "bn", "sig", "swish")
    assert groups[0].output_tensor == "y"
    assert groups[1].nodes == ("maxpool",) and not groups[1].quantizable  # its output is the graph's: float


def test_add_of_two_conv_branches_fuses_into_one_of_them():
    """ResNet downsample block: main conv and projection conv both feed the Add; one absorbs it."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, .3, (4, 3, 1, 1)).astype(np.float32), n) for n in ("wm", "wp")]
    nodes = [
        helper.make_node("Conv", ["x", "wm"], ["main"], name="main_conv"),
        helper.make_node("Conv", ["x", "wp"], ["proj"], name="proj_conv"),
        helper.make_node("Add", ["main", "proj"], ["sum"], name="add"),
        helper.make_node("Relu", ["sum"], ["y"], name="relu"),
    ]
    graph = helper.make_graph(nodes, "down", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=inits)
    groups = fusion_groups(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    assert [g.nodes for g in groups] == [("proj_conv",), ("main_conv", "add", "relu")]
    assert groups[1].residual_input == "proj" and groups[1].input_tensors == ("x", "proj")


def test_a_tensor_read_twice_stops_the_chain():
    proto = models.conv_net()
    # make relu1's input also a graph output: Relu can no longer fuse
    proto.graph.output.append(helper.make_tensor_value_info("conv1", TensorProto.FLOAT, None))
    by = _groups(proto)
    assert by["conv1"].nodes == ("conv1",)
    assert by["relu1"].nodes == ("relu1",)


# --------------------------------------------------------------------------- plans and rules


def test_precedence_default_op_defaults_rules_overrides():
    proto = models.residual_net()
    plan = PrecisionPlan(
        default="int8",
        op_defaults={"Gemm": "fp16"},
        rules=(Rule("fp16", first=1), Rule("fp32", regex="^block_"), Rule("int8", node="block_relu1")),
        overrides={"dw_relu6": "fp32"},  # a node name selects its group
    )
    r = resolve_plan(plan, proto)
    assert r.precision == {
        "stem_conv": "fp16", "block_conv1": "int8", "block_conv2": "fp32", "dw_conv": "fp32",
        "pool": "int8", "flatten": "fp32", "fc": "fp16",
    }
    assert r.reasons["fc"] == "op_defaults[Gemm]"
    assert r.reasons["flatten"].startswith("fallback")
    assert r.reasons["block_conv1"].startswith("rules[2]")
    assert r.reasons["dw_conv"] == "overrides"
    # 6 quantizable groups, 2 of them int8
    assert r.int8_fraction() == pytest.approx(2 / 6)
    frame = r.to_frame()
    assert list(frame["group"]) == [g.name for g in r.groups]
    assert frame.set_index("group").loc["block_conv2", "nodes"] == "block_conv2, block_add, block_relu2"


def test_last_n_and_fallback_fp16():
    r = resolve_plan(PrecisionPlan(default="fp16", rules=(Rule("int8", last=2),), fallback="fp16"),
                     models.mlp_attention())
    assert r.precision["attn_v"] == r.precision["o_proj"] == "int8"
    assert r.precision["qk"] == "fp16"


def test_unknown_names_are_explained_with_suggestions():
    proto = models.residual_net()
    with pytest.raises(PlanError, match=r"'block_cnv2' \(did you mean 'block_conv2'"):
        resolve_plan(PrecisionPlan(overrides={"block_cnv2": "fp32"}), proto)
    with pytest.raises(PlanError, match="no node called 'nope'"):
        resolve_plan(PrecisionPlan(rules=(Rule("fp32", node="nope"),)), proto)
    with pytest.raises(PlanError, match="regex matches no node"):
        resolve_plan(PrecisionPlan(rules=(Rule("fp32", regex="^encoder"),)), proto)
    with pytest.raises(PlanError, match="'LayerNormalization'"):
        resolve_plan(PrecisionPlan(op_defaults={"LayerNormalization": "fp32"}), proto)
    with pytest.raises(PlanError, match="pins: no node called 'not_a_node'"):
        resolve_plan(uniform_plan("int8"), proto).with_pins({"not_a_node": "fp16"})
    many = {f"other_{k:02d}": "fp32" for k in range(20)}  # another model's plan: 8 names shown, the rest counted
    with pytest.raises(PlanError, match=r"'other_07' and 12 more \(20 in all\) in the model") as err:
        resolve_plan(PrecisionPlan(overrides=many), proto)
    assert "other_08" not in str(err.value)


def test_int8_on_an_op_that_cannot_be_quantized_names_node_and_op():
    proto = models.mlp_attention()
    with pytest.raises(PlanError, match=r"node 'softmax' \(op Softmax\), which cannot be quantized"):
        resolve_plan(PrecisionPlan(default="fp16", overrides={"softmax": "int8"}), proto)
    with pytest.raises(PlanError, match="op Softmax"):
        resolve_plan(PrecisionPlan(default="fp16", rules=(Rule("int8", op_type="Softmax"),)), proto)
    r = resolve_plan(uniform_plan("fp16"), proto)
    with pytest.raises(PlanError, match="'add_mask' \\(op Add\\)"):
        r.with_pins({"add_mask": "int8"})
    # int8 by default is fine: the softmax falls back
    assert resolve_plan(uniform_plan("int8"), proto).precision["softmax"] == "fp32"


def test_conflicting_overrides_in_one_group():
    with pytest.raises(PlanError, match="same fusion group 'block_conv2'"):
        resolve_plan(PrecisionPlan(overrides={"block_conv2": "fp16", "block_relu2": "fp32"}),
                     models.residual_net())


def test_malformed_plans():
    with pytest.raises(PlanError, match="unknown key"):
        plan_from_dict({"defualt": "int8"})
    with pytest.raises(PlanError, match="precision 'int4'"):
        plan_from_dict({"default": "int4"})
    with pytest.raises(PlanError, match="exactly one of"):
        plan_from_dict({"rules": [{"node": "a", "regex": "b", "precision": "fp16"}]})
    with pytest.raises(PlanError, match="first=0"):
        plan_from_dict({"rules": [{"first": 0, "precision": "fp16"}]})
    with pytest.raises(PlanError, match="not a valid regular expression"):
        Rule("fp16", regex="(")
    with pytest.raises(PlanError, match="fallback must be fp16 or fp32"):
        PrecisionPlan(fallback="int8")
    with pytest.raises(PlanError, match="not a Rule"):
        PrecisionPlan(rules=("fp16",))
    # rules may be given as tables, like in the file
    assert PrecisionPlan(rules=({"last": 2, "precision": "fp32"},)).rules == (Rule("fp32", last=2),)


@pytest.mark.parametrize("suffix", [".json", ".toml"])
def test_plan_files_round_trip(tmp_path, suffix):
    plan = PrecisionPlan(
        default="int8", op_defaults={"Softmax": "fp32"},
        rules=(Rule("fp16", first=1), Rule("fp32", regex='^block_conv\\d+$'), Rule("fp16", node='we"ird')),
        overrides={"fc": "fp16", "a/b.c": "fp32"}, fallback="fp16", description="hand-edited",
    )
    path = save_plan(plan, tmp_path / f"plan{suffix}", groups=fusion_groups(models.residual_net()))
    assert load_plan(path) == plan
    # deterministic bytes
    again = save_plan(plan, tmp_path / f"again{suffix}", groups=fusion_groups(models.residual_net()))
    assert again.read_bytes() == path.read_bytes()


def test_broken_plan_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(PlanError, match="bad.json: not valid JSON"):
        load_plan(bad)
    toml = tmp_path / "bad.toml"
    toml.write_text("default = int8\n")
    with pytest.raises(PlanError, match="bad.toml: not valid TOML"):
        load_plan(toml)
    with pytest.raises(PlanError, match="no such plan file"):
        load_plan(tmp_path / "absent.json")
    # a precision written into the groups listing (read by no one) is refused, naming overrides
    listed = plan_to_dict(uniform_plan("int8"), groups=fusion_groups(models.residual_net()))
    listed["groups"]["fc"]["precision"] = "fp32"
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(listed))
    with pytest.raises(PlanError, match=r"edited.json: groups\['fc'\] has 'precision'.*overrides"):
        load_plan(edited)


def test_hand_written_toml(tmp_path):
    path = tmp_path / "plan.toml"
    path.write_text(
        'default = "int8"\n'
        '[op_defaults]\nGemm = "fp16"\n'
        '[[rules]]\nlast = 1\nprecision = "fp32"\n'
        '[overrides]\nstem_conv = "fp16"\n'
    )
    r = resolve_plan(load_plan(path), models.residual_net())
    assert r.precision["fc"] == "fp32" and r.precision["stem_conv"] == "fp16"


def test_effective_plan_reproduces_the_assignment_and_hash(tmp_path):
    proto = models.residual_net()
    r = resolve_plan(PrecisionPlan(rules=(Rule("fp16", first=2),)), proto).with_pins({"fc": "fp32"})
    assert r.reasons["fc"] == "pin"
    path = save_plan(r.to_plan(), tmp_path / "effective.json", groups=r.groups)
    data = json.loads(path.read_text())
    assert data["groups"]["block_conv2"]["nodes"] == ["block_conv2", "block_add", "block_relu2"]
    again = resolve_plan(load_plan(path), proto)
    assert again.precision == r.precision
    assert again.plan_hash() == r.plan_hash()
    assert resolve_plan(uniform_plan("int8"), proto).plan_hash() != r.plan_hash()
    assert isinstance(again, ResolvedPlan)


def _yolo_head() -> onnx.ModelProto:
    """Two detection levels as an ultralytics export writes them: per level Concat(box conv, score conv); the
    levels joined by a float Concat that feeds the output (after a Sigmoid on the scores); and an anchor grid
    ``Range(Shape) + 0.5`` joined per level by a Concat, multiplied into the boxes."""
    rng = np.random.default_rng(0)

    def w(name, shape):
        return numpy_helper.from_array(rng.normal(0, 0.3, shape).astype(np.float32), name)

    def scalar(name, value, dtype=np.float32):
        return numpy_helper.from_array(np.array(value, dtype), name)

    nodes = [
        helper.make_node("Conv", ["x", "w_stem"], ["f"], name="stem", pads=[1, 1, 1, 1]),
        helper.make_node("Conv", ["f", "w_box"], ["box"], name="box_conv"),
        helper.make_node("Conv", ["f", "w_cls"], ["cls"], name="cls_conv"),
        helper.make_node("Concat", ["box", "cls"], ["level0"], name="level0_cat", axis=1),
        helper.make_node("MaxPool", ["f"], ["f2"], name="down", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["f2", "w_box"], ["box2"], name="box_conv2"),
        helper.make_node("Conv", ["f2", "w_cls"], ["cls2"], name="cls_conv2"),
        helper.make_node("Concat", ["box2", "cls2"], ["level1"], name="level1_cat", axis=1),
        helper.make_node("Reshape", ["level0", "flat"], ["l0"], name="l0_flat"),
        helper.make_node("Reshape", ["level1", "flat"], ["l1"], name="l1_flat"),
        helper.make_node("Concat", ["l0", "l1"], ["heads"], name="heads_cat", axis=2),
        helper.make_node("Sigmoid", ["heads"], ["scores"], name="scores"),
        helper.make_node("Shape", ["f"], ["f_shape"], name="f_shape"),
        helper.make_node("Gather", ["f_shape", "three"], ["width"], name="width"),
        helper.make_node("Cast", ["width"], ["width_f"], name="width_f", to=TensorProto.FLOAT),
        helper.make_node("Range", ["zero", "width_f", "one"], ["cells"], name="cells"),
        helper.make_node("Add", ["cells", "half"], ["centres"], name="centres"),
        helper.make_node("Concat", ["centres", "centres"], ["grid"], name="grid_cat", axis=0),
        helper.make_node("Mul", ["grid", "stride"], ["anchors"], name="anchors"),
        helper.make_node("Unsqueeze", ["grid", "last"], ["grid2d"], name="grid2d"),
        helper.make_node("MatMul", ["grid2d", "w_pos"], ["pos"], name="pos_proj"),  # a position embedding
    ]
    graph = helper.make_graph(
        nodes, "yolo_head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, "H", "W"])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 6, "A"]),
         helper.make_tensor_value_info("anchors", TensorProto.FLOAT, ["G"]),
         helper.make_tensor_value_info("pos", TensorProto.FLOAT, ["G", 4])],
        [w("w_stem", (4, 3, 3, 3)), w("w_box", (4, 4, 1, 1)), w("w_cls", (2, 4, 1, 1)),
         numpy_helper.from_array(np.array([0, 6, -1], np.int64), "flat"), scalar("three", 3, np.int64),
         scalar("zero", 0.0), scalar("one", 1.0), scalar("half", 0.5), scalar("stride", 8.0),
         numpy_helper.from_array(np.array([1], np.int64), "last"), w("w_pos", (1, 4))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_detection_heads_float_concats_and_anchor_grid_are_not_int8_groups():
    """NudeNet (YOLOv8) and ddddocr (YOLOX): each level's Concat was an INT8 group because another Concat read it,
    though that Concat is float (its output goes to a Sigmoid and the graph output), so box regressions shared
    one scale with scores; and the anchor grid, computed from the input's shape, was quantized with a range
    calibrated at one size (clipped at 416 pixels: 13 dB). The pool between convs stays INT8."""
    groups = {g.name: g for g in fusion_groups(_yolo_head())}
    assert not groups["level0_cat"].quantizable and not groups["level1_cat"].quantizable
    assert not groups["heads_cat"].quantizable
    assert not groups["grid_cat"].quantizable and not groups["pos_proj"].quantizable  # though a MatMul reads it
    assert groups["down"].quantizable and groups["box_conv"].quantizable
