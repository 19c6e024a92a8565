from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import models
from quantlab.errors import ModelError
from quantlab.graph import (
    MIN_OPSET,
    activation_names,
    consumer_map,
    load_model,
    model_from_proto,
    producer_map,
    serialize,
    topological_nodes,
    with_outputs,
)


def test_load_model_reads_specs_and_hash(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(models.conv_net(), path)
    m = load_model(path)
    assert m.input_names == ["input"]
    assert m.output_names == ["logits"]
    assert m.inputs[0].shape == ("N", 3, 16, 16)
    assert m.inputs[0].dtype == "float32"
    assert m.opset == 17
    # the hash is of the file as given: the same bytes give the same hash, other bytes another
    assert load_model(path).sha256 == m.sha256
    onnx.save(models.conv_net(seed=1), tmp_path / "other.onnx")
    assert load_model(tmp_path / "other.onnx").sha256 != m.sha256


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        load_model(tmp_path / "absent.onnx")
    with pytest.raises(ModelError, match="is a folder"):
        load_model(tmp_path)


def test_not_onnx_and_empty(tmp_path):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model at all\n" * 10)
    with pytest.raises(ModelError, match=r"notes\.onnx"):
        load_model(bad)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match="empty"):
        load_model(empty)


@pytest.mark.parametrize("fraction", [0.3, 0.6, 0.9])
def test_truncated_file_is_refused(tmp_path, fraction):
    data = serialize(models.conv_net())
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(ModelError, match=r"cut\.onnx"):
        load_model(path)


def _external_model(tmp_path, location: str):
    model = models.conv_net()
    folder = tmp_path / "model"
    folder.mkdir()
    onnx.save(model, folder / "m.onnx", save_as_external_data=True, all_tensors_to_one_file=True,
              location="weights.bin", size_threshold=0)
    loaded = onnx.load(folder / "m.onnx", load_external_data=False)
    for init in loaded.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(loaded, folder / "m.onnx")
    return folder


def test_external_data_inside_folder_loads(tmp_path):
    folder = _external_model(tmp_path, "weights.bin")
    m = load_model(folder / "m.onnx")
    w1 = next(i for i in m.proto.graph.initializer if i.name == "w1")
    np.testing.assert_array_equal(
        numpy_helper.to_array(w1),
        numpy_helper.to_array(next(i for i in models.conv_net().graph.initializer if i.name == "w1")),
    )


def test_a_model_over_protobufs_limit_with_its_external_data_is_refused_before_reading_it(tmp_path, monkeypatch):
    """The limit lowered to the model's own size (a real 2 GiB model is too big for a test): the file and the size
    are named, nothing is loaded; at the real limit the same model loads."""
    from quantlab.graph import load

    folder = _external_model(tmp_path, "weights.bin")
    graph_bytes = (folder / "m.onnx").stat().st_size
    stored = onnx.load(folder / "m.onnx", load_external_data=False).graph.initializer
    weights = sum(int(e.value) for t in stored for e in t.external_data if e.key == "length")  # not the padding
    assert weights > 0
    assert load_model(folder / "m.onnx").proto.graph.initializer
    monkeypatch.setattr(load, "_PROTOBUF_LIMIT", graph_bytes + weights - 1)
    with pytest.raises(ModelError, match=r"m\.onnx.*GiB.*2 GiB limit"):
        load_model(folder / "m.onnx")
    monkeypatch.setattr(load, "_PROTOBUF_LIMIT", graph_bytes + weights)
    assert load_model(folder / "m.onnx").proto.graph.initializer


@pytest.mark.parametrize("location", ["../weights.bin", "/etc/passwd", "sub/../../weights.bin"])
def test_external_data_escaping_the_folder_is_refused(tmp_path, location):
    folder = _external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes((folder / "weights.bin").read_bytes())
    loaded = onnx.load(folder / "m.onnx", load_external_data=False)
    for init in loaded.graph.initializer:
        for entry in init.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(loaded, folder / "m.onnx")
    with pytest.raises(ModelError, match="folder"):
        load_model(folder / "m.onnx")


def test_external_data_missing_file(tmp_path):
    folder = _external_model(tmp_path, "weights.bin")
    (folder / "weights.bin").unlink()
    with pytest.raises(ModelError, match="does not exist"):
        load_model(folder / "m.onnx")


def test_old_opset_is_upgraded(tmp_path):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="r")], "g", [x], [y]),
        opset_imports=[helper.make_opsetid("", 11)],
    )
    model.ir_version = 7
    path = tmp_path / "old.onnx"
    onnx.save(model, path)
    m = load_model(path)
    assert m.opset == MIN_OPSET
    assert m.upgraded_from_opset == 11


def test_checker_failure_is_a_model_error(tmp_path):
    model = models.conv_net()
    model.graph.node[0].input[1] = "no_such_weight"
    path = tmp_path / "broken.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(ModelError, match=r"broken\.onnx"):
        load_model(path)


def test_activation_names_topological_and_float_only():
    m = model_from_proto(models.residual_net())
    names = activation_names(m.proto)
    assert names[0] == "input"
    assert names.index("stem_relu") < names.index("sum") < names.index("logits")
    assert "w1" not in names and "clip_min" not in names
    producers = producer_map(m.proto)
    consumers = consumer_map(m.proto)
    assert producers["sum"].name == "block_add"
    assert {n.name for n in consumers["stem_relu"]} == {"block_conv1", "block_add"}
    assert [n.name for n in topological_nodes(m.proto)][0] == "stem_conv"


def test_with_outputs_exposes_intermediates():
    m = model_from_proto(models.conv_net())
    exposed = with_outputs(m.proto, ["relu1", "logits"])
    assert [o.name for o in exposed.graph.output] == ["logits", "relu1"]
    assert [o.name for o in m.proto.graph.output] == ["logits"]  # original untouched


def test_duplicate_node_names_are_refused_up_front_naming_nodes_and_fix(tmp_path):
    path = tmp_path / "dup.onnx"
    onnx.save(models.duplicate_names_net(), path)
    with pytest.raises(ModelError) as err:
        load_model(path)
    text = str(err.value)
    assert str(path) in text and "'dup'" in text and "#0 (Relu), #1 (Relu)" in text and "unique name" in text
    with pytest.raises(ModelError, match="'dup' is used by 2 nodes"):
        model_from_proto(models.duplicate_names_net())


def test_duplicate_names_inside_a_subgraph_are_refused():
    then = helper.make_graph([helper.make_node("Relu", ["x"], ["t1"], name="same"),
                              helper.make_node("Relu", ["t1"], ["t2"], name="same")], "then", [],
                             [helper.make_tensor_value_info("t2", TensorProto.FLOAT, [2])])
    other = helper.make_graph([helper.make_node("Neg", ["x"], ["e"], name="neg")], "else", [],
                              [helper.make_tensor_value_info("e", TensorProto.FLOAT, [2])])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then, else_branch=other)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("c", TensorProto.BOOL, []),
                                            helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    with pytest.raises(ModelError, match="subgraph 'then_branch' of node 'branch'"):
        model_from_proto(proto)


def test_nodes_without_names_are_not_duplicates():
    proto = models.conv_net()
    for node in proto.graph.node:
        node.name = ""
    assert len(model_from_proto(proto).proto.graph.node) == 7


def test_unreadable_model_is_a_permission_error_naming_file_and_fix(tmp_path):
    path = tmp_path / "secret.onnx"
    onnx.save(models.conv_net(), path)
    path.chmod(0)
    with models.permissions_enforced(), pytest.raises(PermissionError) as err:
        load_model(path)
    assert err.value.filename == str(path)
    assert "cannot read model" in str(err.value) and f"chmod a+r {path}" in str(err.value)


def test_unreadable_external_data_is_a_permission_error(tmp_path):
    folder = _external_model(tmp_path, "weights.bin")
    (folder / "weights.bin").chmod(0)
    with models.permissions_enforced(), pytest.raises(PermissionError) as err:
        load_model(folder / "m.onnx")
    assert err.value.filename == str(folder / "weights.bin") and "cannot read model" in str(err.value)


def test_a_model_without_float_activations_is_refused_by_calibrate_naming_it(tmp_path):
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import check_float_activations

    path = tmp_path / "ids.onnx"
    onnx.save(models.relu_net(["N", 4], TensorProto.INT64), path)
    model = load_model(path)
    with pytest.raises(ModelError) as err:
        check_float_activations(model)
    assert str(path) in str(err.value) and "no float activation tensors" in str(err.value)
    assert "'input' int64" in str(err.value)
    data = from_arrays({"input": np.ones((4, 4), np.int64)})
    with pytest.raises(ModelError, match="no float activation tensors to calibrate"):
        calibrate(model, data, "minmax")
    check_float_activations(model_from_proto(models.conv_net()))  # a float model passes


def test_an_already_quantized_model_is_told_to_calibrate_its_float_source():
    from quantlab.graph import check_float_activations

    inits = [numpy_helper.from_array(np.array(0.1, np.float32), "s"), numpy_helper.from_array(np.array(128, np.uint8), "z"),
             numpy_helper.from_array(np.full((4, 2), 130, np.uint8), "w")]
    node = helper.make_node("QLinearMatMul", ["x", "s", "z", "w", "s", "z", "s", "z"], ["y"], name="qmm")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.UINT8, ["N", 2])], initializer=inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    with pytest.raises(ModelError, match="QLinearMatMul: it is already quantized; calibrate the float model"):
        check_float_activations(model_from_proto(proto))


def test_outputs_of_contrib_ops_get_their_inputs_float_type_and_are_calibrated():
    """ONNX shape inference knows no com.microsoft schema: Gelu's output (and what follows) had no type, so
    it was not calibrated while the writer quantized the MatMul reading it ("no range for 'g'")."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import activation_names, model_from_proto, tensor_specs
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1"),
         helper.make_node("Gelu", ["h"], ["g"], name="gelu", domain="com.microsoft"),
         helper.make_node("MatMul", ["g", "w2"], ["z"], name="fc2"),
         helper.make_node("Relu", ["z"], ["y"], name="relu")], "contrib",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (16, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.normal(0, 0.3, (32, 8)).astype(np.float32), "w2")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    specs = tensor_specs(model.proto)
    assert specs["g"].dtype == "float32" and specs["z"].dtype == "float32"
    assert {"h", "g", "z", "y"} <= set(activation_names(model.proto))
    data = from_arrays({"x": rng.normal(size=(16, 16)).astype(np.float32)})
    table = calibrate(model, data, "minmax").tables["minmax"]
    assert "g" in table.ranges
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "g" for n in written.proto.graph.node)


def _ort_contrib_rules() -> dict:
    """The rules of quantlab.graph.contrib_types, derived again from the installed ONNX Runtime's schemas."""
    from onnxruntime.capi import onnxruntime_pybind11_state as schemas

    rules: dict = {}
    for s in schemas.get_all_operator_schema():
        if s.domain in ("", "ai.onnx", "ai.onnx.ml", "ai.onnx.preview.training", "ai.onnx.training"):
            continue
        allowed = {t.type_param_str: sorted(t.allowed_type_strs) for t in s.type_constraints}
        per = []
        for o in s.outputs:
            same = tuple(i for i, f in enumerate(s.inputs) if f.typeStr == o.typeStr)[:3]
            types = allowed.get(o.typeStr, [o.typeStr])
            per.append(same or (types[0][7:-1] if len(types) == 1 and types[0].startswith("tensor(") else None))
        key = (s.domain, s.name)
        if key in rules and rules[key] != tuple(per):  # versions that disagree: unknown where they do
            old = rules[key]
            per = [a if a == b else None for a, b in zip(old, per)] + [None] * abs(len(per) - len(old))
        rules[key] = tuple(per)
    return rules


def test_contrib_output_types_agree_with_onnxruntimes_own_schemas():
    """The table quantlab ships (the graph layer does not import ONNX Runtime) against the installed ONNX
    Runtime's operator schemas: every op both know has the same rules. On a newer ONNX Runtime a changed
    schema fails here: regenerate quantlab/graph/contrib_types.py with _ort_contrib_rules()."""
    from quantlab.graph.contrib_types import CONTRIB_OUTPUT_TYPES

    ort_rules = _ort_contrib_rules()
    shared = set(ort_rules) & set(CONTRIB_OUTPUT_TYPES)
    assert len(shared) >= 0.9 * len(CONTRIB_OUTPUT_TYPES)  # ops ONNX Runtime dropped stay in the table, a few
    differ = {k: (CONTRIB_OUTPUT_TYPES[k], ort_rules[k]) for k in shared if CONTRIB_OUTPUT_TYPES[k] != ort_rules[k]}
    assert not differ, differ
    assert CONTRIB_OUTPUT_TYPES["com.microsoft", "EmbedLayerNormalization"][1] == (0, 1, 7)  # mask_index: the ids'
    assert CONTRIB_OUTPUT_TYPES["com.microsoft", "SkipLayerNormalization"][1] == "float"


def test_an_embedding_layer_norm_types_its_float_output_and_its_int32_mask_apart():
    """ONNX Runtime's transformer optimizer starts BERT with EmbedLayerNormalization(int32 ids, ..., float
    tables) -> (float embedding, int32 mask_index): typing outputs from the first input made the embedding
    untyped (its first input is int32), so nothing downstream was calibrated ("no range" for every MatMul)."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto, tensor_specs
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    rng = np.random.default_rng(0)
    hidden, vocab = 16, 30
    tables = {"words": (vocab, hidden), "positions": (8, hidden), "segments": (2, hidden)}
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, shape).astype(np.float32), k) for k, shape in tables.items()]
    inits += [numpy_helper.from_array(np.ones(hidden, np.float32), "gamma"),
              numpy_helper.from_array(np.zeros(hidden, np.float32), "beta"),
              numpy_helper.from_array(rng.normal(0, 0.3, (hidden, 4)).astype(np.float32), "w")]
    graph = helper.make_graph(
        [helper.make_node("EmbedLayerNormalization", ["ids", "segment_ids", "words", "positions", "segments",
                                                      "gamma", "beta", "mask"], ["embedded", "mask_index"],
                          name="embed", domain="com.microsoft", epsilon=1e-5),
         helper.make_node("MatMul", ["embedded", "w"], ["logits"], name="head")], "embed",
        [helper.make_tensor_value_info("ids", TensorProto.INT32, ["N", "S"]),
         helper.make_tensor_value_info("segment_ids", TensorProto.INT32, ["N", "S"]),
         helper.make_tensor_value_info("mask", TensorProto.INT32, ["N", "S"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", "S", 4])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    specs = tensor_specs(model.proto)
    assert specs["embedded"].dtype == "float32" and specs["logits"].dtype == "float32"
    assert specs["mask_index"].dtype == "int32"
    ids = rng.integers(0, vocab, (12, 8)).astype(np.int32)
    data = from_arrays({"ids": ids, "segment_ids": (np.arange(8) >= 4).astype(np.int32)[None].repeat(12, 0),
                        "mask": np.ones((12, 8), np.int32)})
    table = calibrate(model, data, "minmax").tables["minmax"]
    assert "embedded" in table.ranges and "mask_index" not in table.ranges
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    assert any(n.op_type == "QuantizeLinear" and n.input[0] == "embedded" for n in written.proto.graph.node)


def test_identity_over_an_initializer_is_folded_so_the_weight_stays_a_weight():
    """torch writes Identity(W) for a parameter equal to another: the MatMul reading it got activation Q/DQ
    (one calibrated scale) and the copy was calibrated as a tensor. The reader now reads W itself."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import activation_names, model_from_proto
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (8, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["w"], ["w_again"], name="shared"),
         helper.make_node("MatMul", ["x", "w"], ["h"], name="fc1"),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("MatMul", ["r", "w_again"], ["y"], name="fc2")], "tied",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(w, "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    assert "Identity" not in {n.op_type for n in model.proto.graph.node}
    assert next(n for n in model.proto.graph.node if n.name == "fc2").input[1] == "w"
    assert "w_again" not in activation_names(model.proto)
    table = calibrate(model, from_arrays({"x": rng.normal(size=(16, 8)).astype(np.float32)}), "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt",
                                                                           per_channel_weights=True))
    weight_dq = [n for n in written.proto.graph.node if n.op_type == "DequantizeLinear"
                 and any(a.name == "axis" for a in n.attribute)]
    assert weight_dq  # per-channel weight Q/DQ, which a weight read as an activation never gets
    assert "w_again" not in {n.input[0] for n in written.proto.graph.node if n.op_type == "QuantizeLinear"}


def test_inference_and_checker_on_the_weightless_copy_match_the_full_model():
    """quantlab.graph.light: a 2048-value weight becomes a typed input (no data), a 2-value Reshape target
    stays (data propagation reads it); inference finds exactly what it finds on the full model."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.graph.light import LIGHT_LIMIT, check_light, infer_light, light_copy

    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["h"], name="fc"),
         helper.make_node("Reshape", ["h", "shape"], ["r"], name="fold"),
         helper.make_node("Relu", ["r"], ["y"], name="relu")], "light",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", 16])],
        [numpy_helper.from_array(rng.normal(size=(32, 64)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([-1, 16], np.int64), "shape")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    light = light_copy(proto)
    assert [i.name for i in light.graph.initializer] == ["shape"] and 32 * 64 > LIGHT_LIMIT
    assert "w" in {i.name for i in light.graph.input}
    full = onnx.shape_inference.infer_shapes(proto, strict_mode=False)
    mine = onnx.ModelProto()
    mine.CopyFrom(proto)
    infer_light(mine, strict_mode=False)
    assert [v.SerializeToString() for v in mine.graph.value_info] == [v.SerializeToString() for v in full.graph.value_info]
    assert mine.graph.output[0].SerializeToString() == full.graph.output[0].SerializeToString()
    assert len(mine.graph.initializer) == 2 and [i.name for i in mine.graph.input] == ["x"]
    check_light(proto)
    broken = onnx.ModelProto()
    broken.CopyFrom(proto)
    broken.graph.node[1].input[1] = "nowhere"
    with pytest.raises(Exception, match="nowhere"):
        check_light(broken)


@pytest.mark.parametrize("build", ["token_rnn", "voice_activity", "scan_rnn", "residual_net", "position_table_net",
                                   "text_recognizer"])
def test_inferred_model_is_what_full_inference_returns_byte_for_byte(build):
    """graph.light.inferred_model (loading's shape inference): the bytes onnx's infer_shapes gives on the full model,
    value infos inside Loop/Scan/If bodies, metadata and an empty doc string set included."""
    import onnx

    import models
    from quantlab.graph.light import inferred_model, light_copy

    proto = getattr(models, build)()
    if build == "voice_activity":  # its 128x128 weights leave the light copy: the restoring is tested too
        assert len(light_copy(proto).graph.initializer) < len(proto.graph.initializer)
    proto.doc_string = ""  # present but empty: still a field the bytes carry
    proto.metadata_props.add(key="k", value="v")
    want = onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=True)
    got = inferred_model(proto, strict_mode=False, data_prop=True)
    assert got.SerializeToString(deterministic=True) == want.SerializeToString(deterministic=True)


def test_float16_stored_weights_cast_up_are_float32_weights_after_loading():
    """A float32 model stored with float16 weights (Cast(to=FLOAT) at every run) was refused as 'already
    computing in float16', and its Conv read the Cast's output as an activation. Loading casts once: the
    weight is a float32 initializer of the same values, written with per-channel weight Q/DQ."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto, serialize
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    rng = np.random.default_rng(0)
    w16 = rng.normal(0, 0.3, (8, 3, 3, 3)).astype(np.float16)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["w16"], ["w"], name="cast_w", to=TensorProto.FLOAT),
         helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
         helper.make_node("Relu", ["c"], ["y"], name="relu"),
         helper.make_node("Cast", ["w16"], ["w16_out"], name="cast_out", to=TensorProto.FLOAT)], "stored_half",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 8]),
         helper.make_tensor_value_info("w16_out", TensorProto.FLOAT, [8, 3, 3, 3])],
        [numpy_helper.from_array(w16, "w16")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    inits = {i.name: i for i in model.proto.graph.initializer}
    assert inits["w"].data_type == TensorProto.FLOAT
    np.testing.assert_array_equal(numpy_helper.to_array(inits["w"]), w16.astype(np.float32))
    assert [n.name for n in model.proto.graph.node if n.op_type == "Cast"] == ["cast_out"]  # a graph output stays
    x = rng.normal(size=(8, 3, 8, 8)).astype(np.float32)

    def run(p):
        return ort.InferenceSession(serialize(p), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]

    np.testing.assert_array_equal(run(model.proto), run(proto))
    table = calibrate(model, from_arrays({"x": x}), "minmax").tables["minmax"]
    assert "w" not in table.ranges
    # the float16 weight a graph output still reads (through its Cast to float32) stays, and is written as it was
    kept = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    out = ort.InferenceSession(serialize(kept.proto), providers=["CPUExecutionProvider"]).run(["w16_out"], {"x": x})
    np.testing.assert_array_equal(out[0], w16.astype(np.float32))
    del proto.graph.output[1]
    del proto.graph.node[3]
    model = model_from_proto(proto)
    assert "w16" not in {i.name for i in model.proto.graph.initializer}
    written = write_model(model, uniform_plan("int8"), model_table := calibrate(
        model, from_arrays({"x": x}), "minmax").tables["minmax"], WriteOptions(target="tensorrt"))
    assert set(model_table.ranges) == set(table.ranges) - {"w16_out"}
    weight_dq = next(n for n in written.proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w/int8")
    assert any(a.name == "axis" for a in weight_dq.attribute)  # per-channel weight Q/DQ, not a calibrated scale


def test_transposed_and_reshaped_weights_are_weights_after_loading():
    """torch without constant folding writes MatMul(x, Transpose(W)): the MatMul read an activation (a
    calibrated per-tensor scale). Loading computes the layout once (ONNX's reference Transpose, Reshape...),
    chains included, so the MatMul reads an initializer and gets per-channel weight Q/DQ."""
    import numpy as np
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto, serialize
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.4, (6, 10)).astype(np.float32)  # torch's Linear weight: [out, in]
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["w"], ["wt"], name="t", perm=[1, 0]),
         helper.make_node("MatMul", ["x", "wt"], ["h"], name="fc"),
         helper.make_node("Reshape", ["w", "flat"], ["w_flat"], name="r"),
         helper.make_node("Unsqueeze", ["w_flat", "axis0"], ["w_row"], name="u"),
         helper.make_node("Add", ["h", "bias"], ["y"], name="bias_add")], "views",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 5, 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5, 6]),
         helper.make_tensor_value_info("w_row", TensorProto.FLOAT, [1, 60])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(rng.normal(size=6).astype(np.float32), "bias"),
         numpy_helper.from_array(np.array([-1], np.int64), "flat"),
         numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    inits = {i.name: numpy_helper.to_array(i) for i in model.proto.graph.initializer}
    np.testing.assert_array_equal(inits["wt"], w.T)
    assert [n.op_type for n in model.proto.graph.node] == ["MatMul", "Unsqueeze", "Add"]  # w_row: a graph output
    x = rng.normal(size=(4, 5, 10)).astype(np.float32)

    def run(p):
        return ort.InferenceSession(serialize(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    for got, want in zip(run(model.proto), run(proto), strict=True):
        np.testing.assert_array_equal(got, want)
    table = calibrate(model, from_arrays({"x": x}), "minmax").tables["minmax"]
    assert "wt" not in table.ranges
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    dq = next(n for n in written.proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "wt/int8")
    assert any(a.name == "axis" and a.i == 1 for a in dq.attribute)  # per output channel of the [in, out] weight


def _weight_norm_conv() -> "onnx.ModelProto":
    """wav2vec2's positional conv as torch exports it without constant folding: W = g * v / ||v|| (per output
    channel), computed at every run; a GroupNorm-style bias Unsqueeze(b, Constant axes) read by an Add; and a
    scale computed from the graph input, which is not a constant."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(3)
    v = (rng.normal(0, 0.3, (8, 4, 3)) * np.exp(rng.uniform(-1.5, 1.5, (8, 1, 1)))).astype(np.float32)
    g = np.abs(rng.normal(1.0, 0.5, (8, 1, 1))).astype(np.float32)
    axes = numpy_helper.from_array(np.array([1], np.int64))
    nodes = [helper.make_node("ReduceL2", ["v", "norm_axes"], ["norm"], name="norm", keepdims=1),
             helper.make_node("Div", ["g", "norm"], ["ratio"], name="ratio"),
             helper.make_node("Mul", ["v", "ratio"], ["w"], name="scale_w"),
             helper.make_node("Conv", ["x", "w", "b"], ["c"], name="pos_conv", pads=[1, 1]),
             helper.make_node("Constant", [], ["one_axis"], name="one_axis", value=axes),
             helper.make_node("Unsqueeze", ["shift", "one_axis"], ["shift_col"], name="unsq"),
             helper.make_node("Add", ["c", "shift_col"], ["y0"], name="shift_add"),
             helper.make_node("ReduceMax", ["x"], ["xmax"], name="xmax", keepdims=1),
             helper.make_node("Mul", ["u", "xmax"], ["u_scaled"], name="u_scaled"),
             helper.make_node("Conv", ["y0", "u_scaled"], ["y"], name="dyn_conv")]
    graph = helper.make_graph(
        nodes, "weight_norm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 12])],
        [numpy_helper.from_array(v, "v"), numpy_helper.from_array(g, "g"),
         numpy_helper.from_array(np.array([1, 2], np.int64), "norm_axes"),
         numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "b"),
         numpy_helper.from_array(rng.normal(size=8).astype(np.float32), "shift"),
         numpy_helper.from_array(rng.normal(0, 0.3, (8, 8, 1)).astype(np.float32), "u")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    proto.ir_version = 8
    return proto


def test_weights_computed_from_constants_are_weights_after_loading():
    """torch without constant folding (and its dynamo exporter) keeps weight_norm as ReduceL2/Div/Mul on two
    parameters: the conv's weight was calibrated like an activation (one per-tensor scale, amax clipped by
    entropy) and bias correction skipped the layer. Loading computes it once: an initializer with numpy's
    values, per-channel weight Q/DQ; a weight scaled by the input stays computed."""
    import numpy as np
    import onnxruntime as ort
    from onnx import numpy_helper

    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto, serialize
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    proto = _weight_norm_conv()
    model = model_from_proto(proto)
    inits = {i.name: numpy_helper.to_array(i) for i in model.proto.graph.initializer}
    src = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    want = src["v"] * (src["g"] / np.sqrt((src["v"].astype(np.float64) ** 2).sum(axis=(1, 2), keepdims=True)))
    np.testing.assert_allclose(inits["w"], want, rtol=3e-7)
    # the Unsqueezed shift became a weight, and then the conv's bias (graph/conv_bias.py)
    np.testing.assert_allclose(inits["pos_conv/add_folded_bias"], src["b"] + src["shift"], rtol=1e-6)
    ops = [n.op_type for n in model.proto.graph.node]
    assert ops == ["Conv", "ReduceMax", "Mul", "Conv"], ops  # norm, Div, Mul, Constant, Unsqueeze, Add gone
    assert not {"v", "g", "norm_axes", "shift", "shift_col"} & set(inits) and "u" in inits
    x = np.random.default_rng(4).normal(size=(6, 4, 12)).astype(np.float32)

    def run(p):
        return ort.InferenceSession(serialize(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(model.proto), run(proto), rtol=1e-5, atol=1e-5)
    table = calibrate(model, from_arrays({"x": x}), "entropy").tables["entropy"]
    assert "w" not in table.ranges and "shift_col" not in table.ranges and "u_scaled" in table.ranges
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    dq = next(n for n in written.proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == "w/int8")
    assert any(a.name == "axis" and a.i == 0 for a in dq.attribute)  # one scale per output channel


def _torch_lstm(hidden: int = 8, features: int = 6) -> onnx.ModelProto:
    """An LSTM as torch exports it: W, R and B are Concats of Slices of the parameters (gates reordered)."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(0, 0.3, (4 * hidden, n)).astype(np.float32), name)
             for name, n in (("w_ih", features), ("w_hh", hidden))]
    inits.append(numpy_helper.from_array(rng.normal(0, 0.3, (8 * hidden,)).astype(np.float32), "b"))
    nodes = []
    for name, rows in (("w_ih", 4 * hidden), ("w_hh", 4 * hidden), ("b", 8 * hidden)):
        half = rows // 2
        for k, (lo, hi) in enumerate(((half, rows), (0, half))):  # the two halves swapped
            for t, v in (("lo", lo), ("hi", hi), ("ax", 0)):
                inits.append(numpy_helper.from_array(np.array([v], np.int64), f"{name}_{t}{k}"))
            nodes.append(helper.make_node("Slice", [name, f"{name}_lo{k}", f"{name}_hi{k}", f"{name}_ax{k}"],
                                          [f"{name}_part{k}"]))
        nodes.append(helper.make_node("Concat", [f"{name}_part0", f"{name}_part1"], [f"{name}_cat"], axis=0,
                                      name=f"{name}/Concat"))
        nodes.append(helper.make_node("Unsqueeze", [f"{name}_cat", "zero_axis"], [f"{name}_3d"]))
    inits.append(numpy_helper.from_array(np.array([0], np.int64), "zero_axis"))
    nodes.append(helper.make_node("LSTM", ["x", "w_ih_3d", "w_hh_3d", "b_3d"], ["y", "h", "c"], hidden_size=hidden,
                                  name="lstm"))
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", features])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", 1, "N", hidden])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto


def test_recurrent_weights_made_of_slices_are_weights_after_loading():
    """Silero VAD's LSTM (torch): its W, R, B were Concat(Slice(param), ...) at every run, so the plan took each
    Concat for an INT8 group and wrote per-tensor activation Q/DQ on the weights (the bias clipped by entropy to
    0.52 of 0.84). Loading computes them once: initializers, no Concat left, the same outputs."""
    import onnxruntime as ort

    from quantlab.graph import model_from_proto, serialize
    from quantlab.plan import fusion_groups

    proto = _torch_lstm()
    model = model_from_proto(proto)
    assert [n.op_type for n in model.proto.graph.node] == ["LSTM"]
    assert {"w_ih_3d", "w_hh_3d", "b_3d"} <= {i.name for i in model.proto.graph.initializer}
    assert not any(g.quantizable for g in fusion_groups(model.proto))
    x = np.random.default_rng(1).normal(size=(5, 2, 6)).astype(np.float32)

    def run(p):
        return ort.InferenceSession(serialize(p), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_array_equal(run(model.proto), run(proto))


def _tf_same_padding_model(pad_value: float = 0.0) -> onnx.ModelProto:
    """tf2onnx's SAME padding: a zero Pad (pads an initializer, then a Constant node) before each Conv."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.normal(size=(4, 4, 3, 3)).astype(np.float32), "w2")
    p1 = numpy_helper.from_array(np.array([0, 0, 0, 0, 0, 0, 1, 1], np.int64), "p1")
    value = numpy_helper.from_array(np.array(pad_value, np.float32), "value")
    nodes = [
        helper.make_node("Pad", ["x", "p1", "value"], ["x:pad"], name="stem/Pad"),
        helper.make_node("Conv", ["x:pad", "w1"], ["c1"], name="stem/Conv2D", strides=[2, 2]),
        helper.make_node("Relu", ["c1"], ["r1"], name="stem/Relu"),
        helper.make_node("Constant", [], ["p2"], name="p2", value=numpy_helper.from_array(
            np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))),
        helper.make_node("Pad", ["r1", "p2"], ["r1:pad"], name="block/Pad"),
        helper.make_node("Conv", ["r1:pad", "w2"], ["y"], name="block/Conv2D"),
    ]
    graph = helper.make_graph(nodes, "tf", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 4, 4])], [w1, w2, p1, value])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_zero_pad_before_a_conv_moves_into_its_pads_at_load():
    """tf2onnx writes SAME padding as a Pad node: left there, a Q/DQ sat after it and the Pad ran as a float layer
    between the Conv and its input's Q/DQ, in a fusion group of its own."""
    import onnxruntime as ort

    proto = _tf_same_padding_model()
    loaded = model_from_proto(proto, label="tf")
    assert [n.op_type for n in loaded.proto.graph.node] == ["Conv", "Relu", "Conv"]
    assert {i.name for i in loaded.proto.graph.initializer} == {"w1", "w2"}
    pads = [next(helper.get_attribute_value(a) for a in n.attribute if a.name == "pads")
            for n in loaded.proto.graph.node if n.op_type == "Conv"]
    assert pads == [[0, 0, 1, 1], [1, 1, 1, 1]]
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)

    def run(model: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(loaded.proto), run(proto), rtol=1e-5, atol=1e-5)
    kept = model_from_proto(_tf_same_padding_model(pad_value=1.0), label="tf")  # a non-zero value is no Conv pad
    assert [n.op_type for n in kept.proto.graph.node].count("Pad") == 1


def _conv_bn_model(shared: bool = False, conv_output_kept: bool = False) -> onnx.ModelProto:
    """x ─► Conv(w) ─► BatchNorm ─► Relu ─► Conv(w or w2, no bias) ─► BatchNorm ─► y (the dynamo exporter's form)."""
    rng = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(rng.normal(size=(c, c, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=c).astype(np.float32), "b"),
             numpy_helper.from_array(rng.normal(size=(c, c, 3, 3)).astype(np.float32), "w2")]
    for k in (1, 2):
        inits += [numpy_helper.from_array(rng.uniform(0.5, 2, c).astype(np.float32), f"gamma{k}"),
                  numpy_helper.from_array(rng.normal(size=c).astype(np.float32), f"beta{k}"),
                  numpy_helper.from_array(rng.normal(size=c).astype(np.float32), f"mean{k}"),
                  numpy_helper.from_array(rng.uniform(0.1, 3, c).astype(np.float32), f"var{k}")]
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c1", "gamma1", "beta1", "mean1", "var1"], ["n1"], name="bn1",
                              epsilon=1e-3),
             helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
             helper.make_node("Conv", ["r1", "w" if shared else "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
             helper.make_node("BatchNormalization", ["c2", "gamma2", "beta2", "mean2", "var2"], ["y"], name="bn2")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c, 6, 6])]
    if conv_output_kept:
        outputs.append(helper.make_tensor_value_info("c2", TensorProto.FLOAT, ["N", c, 6, 6]))
    graph = helper.make_graph(nodes, "convbn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c, 6, 6])],
                              outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("shared", [False, True])
def test_a_batchnorm_after_a_conv_is_folded_into_it_at_load(shared):
    """The dynamo exporter keeps BatchNorm nodes; ORT's form then quantized each conv's output before its BN (a
    Conv3d model lost 10 dB). Folded at load, as TensorRT folds it: same outputs up to float32 rounding, a weight
    two convs share gets one folded copy each, and a conv output the graph also returns keeps its BN."""
    import onnxruntime as ort

    proto = _conv_bn_model(shared=shared)
    loaded = model_from_proto(proto, label="convbn")
    assert [n.op_type for n in loaded.proto.graph.node] == ["Conv", "Relu", "Conv"]
    assert [n.output[0] for n in loaded.proto.graph.node] == ["n1", "r1", "y"]
    names = {i.name for i in loaded.proto.graph.initializer}
    assert not names & {"b", "gamma1", "beta1", "mean1", "var1", "gamma2", "beta2", "mean2", "var2"}
    assert ("w" in names) == (not shared) and ("conv1/bn_folded_weight" in names) == shared
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)

    def run(model: onnx.ModelProto) -> list[np.ndarray]:
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT would fold the BN itself
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
            None, {"x": x})

    np.testing.assert_allclose(run(loaded.proto)[0], run(proto)[0], rtol=1e-5, atol=1e-5)
    kept = model_from_proto(_conv_bn_model(conv_output_kept=True), label="kept")
    assert [n.op_type for n in kept.proto.graph.node] == ["Conv", "Relu", "Conv", "BatchNormalization"]


def _unoptimised_run(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    """The model's first output for ``x``, ONNX Runtime's own graph rewrites off (it would fold a BN itself)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]).run(
        None, {"x": x})[0]


@pytest.mark.parametrize("group", [1, 2])
def test_a_batchnorm_after_a_conv_transpose_is_folded_per_output_channel(group):
    """DBNet's upsampling head: ConvTranspose(stride 2) + BatchNorm + Relu. Its weight is [C_in, C_out/G, k, k], so
    the BN's per-channel scale goes on axis 1 within each group; folded on axis 0 the outputs would differ."""

    rng = np.random.default_rng(2)
    c_in, c_out = 4, 6
    inits = [numpy_helper.from_array(rng.normal(size=(c_in, c_out // group, 2, 2)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.uniform(0.5, 2, c_out).astype(np.float32), "gamma"),
             numpy_helper.from_array(rng.normal(size=c_out).astype(np.float32), "beta"),
             numpy_helper.from_array(rng.normal(size=c_out).astype(np.float32), "mean"),
             numpy_helper.from_array(rng.uniform(0.1, 3, c_out).astype(np.float32), "var")]
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["up"], name="deconv", strides=[2, 2], group=group),
             helper.make_node("BatchNormalization", ["up", "gamma", "beta", "mean", "var"], ["n"], name="bn"),
             helper.make_node("Relu", ["n"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "deconvbn",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", c_in, 5, 5])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", c_out, 10, 10])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = model_from_proto(proto, label="deconvbn")
    assert [n.op_type for n in loaded.proto.graph.node] == ["ConvTranspose", "Relu"]
    x = rng.normal(size=(2, c_in, 5, 5)).astype(np.float32)
    np.testing.assert_allclose(_unoptimised_run(loaded.proto, x), _unoptimised_run(proto, x), rtol=1e-5, atol=1e-5)


def test_parameters_in_constant_nodes_fold_like_initializers():
    """paddle2onnx writes parameters as Constant nodes: PP-OCRv4's detector kept a BatchNorm whose variance (1e7)
    its FP16 copy clipped to 65504 (SQNR -0.7 dB). Loading makes them initializers, so the BN folds, and the FP16
    model keeps the values."""

    proto = _conv_bn_model()
    for init in [i for i in proto.graph.initializer if i.name.endswith("1")]:  # bn1's, not the convs' weights
        value = numpy_helper.to_array(init) * (2e7 if init.name == "var1" else 1.0)
        proto.graph.node.insert(0, helper.make_node("Constant", [], [init.name], value=numpy_helper.from_array(
            value.astype(np.float32), init.name)))
        proto.graph.initializer.remove(init)
    assert sum(n.op_type == "Constant" for n in proto.graph.node) == 4
    loaded = model_from_proto(proto, label="convbn, BN parameters in Constant nodes")
    assert [n.op_type for n in loaded.proto.graph.node] == ["Conv", "Relu", "Conv"]
    x = np.random.default_rng(1).normal(size=(2, 4, 6, 6)).astype(np.float32)
    np.testing.assert_allclose(_unoptimised_run(loaded.proto, x), _unoptimised_run(proto, x), rtol=1e-5, atol=1e-5)


def test_pads_computed_from_constants_fold_and_their_chain_goes():
    """The legacy exporter writes F.pad's pads as a chain of constant ops (ConstantOfShape, Concat, Slice with step
    -1, ...) that its own folding leaves: the Pad stayed, a float layer of its own, 56 extra fp32 groups on a
    MobileNetV3. The chain is evaluated; the Pad goes into the Conv, and the chain with it."""
    proto = _tf_same_padding_model()
    first = proto.graph.node[0]
    first.input[1] = "p1_computed"
    proto.graph.node.insert(0, helper.make_node("Concat", ["p_head", "p_tail"], ["p1_computed"], name="pads/concat",
                                                axis=0))
    proto.graph.node.insert(0, helper.make_node("Constant", [], ["p_tail"], name="pads/tail",
                                                value=numpy_helper.from_array(np.array([1, 1], np.int64))))
    proto.graph.node.insert(0, helper.make_node("ConstantOfShape", ["six"], ["p_head"], name="pads/zeros",
                                                value=numpy_helper.from_array(np.array([0], np.int64))))
    proto.graph.initializer.append(numpy_helper.from_array(np.array([6], np.int64), "six"))
    del proto.graph.initializer[[i.name for i in proto.graph.initializer].index("p1")]
    loaded = model_from_proto(proto, label="legacy pads")
    assert [n.op_type for n in loaded.proto.graph.node] == ["Conv", "Relu", "Conv"]
    assert {i.name for i in loaded.proto.graph.initializer} == {"w1", "w2"}


def test_a_constant_per_channel_add_after_a_conv_loads_as_its_bias():
    """paddle2onnx's Conv without bias + Add(Reshape(bias)): the ORT form quantized the conv's output and the Add's
    again (no int32 bias, and the second rounding charged to the next layer). Folded as TensorRT fuses it; an Add
    along the width ([C] against [N, C, H, W]) or of a conv output read twice stays."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    c = 4
    inits = [numpy_helper.from_array(rng.normal(size=(c, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(size=(c, c, 1, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(rng.normal(size=(c,)).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.normal(size=(1, c, 1, 1)).astype(np.float32), "k"),
             numpy_helper.from_array(rng.normal(size=(c, 1, 1)).astype(np.float32), "k2"),
             numpy_helper.from_array(rng.normal(size=(6,)).astype(np.float32), "along_w")]
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["k", "c"], ["a"], name="bias_add"),
             helper.make_node("Conv", ["a", "w2", "b2"], ["c2"], name="conv2"),
             helper.make_node("Add", ["c2", "k2"], ["a2"], name="bias_add2"),
             helper.make_node("Conv", ["a2", "w2"], ["c3"], name="conv3"),
             helper.make_node("Add", ["c3", "along_w"], ["y"], name="width_add"),
             helper.make_node("Conv", ["y", "w2"], ["c4"], name="conv4"),
             helper.make_node("Add", ["c4", "k"], ["a4"], name="shared_add"),
             helper.make_node("Mul", ["c4", "a4"], ["z"], name="reads_c4_too")]
    graph = helper.make_graph(nodes, "paddle", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", c, 6, 6])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    loaded = model_from_proto(proto, label="paddle")
    assert [n.name for n in loaded.proto.graph.node] == ["conv", "conv2", "conv3", "width_add", "conv4", "shared_add",
                                                         "reads_c4_too"]
    convs = {n.name: list(n.input) for n in loaded.proto.graph.node if n.op_type == "Conv"}
    assert convs["conv"][2] == "conv/add_folded_bias" and convs["conv2"][2] == "conv2/add_folded_bias"
    assert len(convs["conv3"]) == 2 and len(convs["conv4"]) == 2
    x = rng.normal(size=(2, 3, 6, 6)).astype(np.float32)

    def run(model: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    np.testing.assert_allclose(run(loaded.proto), run(proto), rtol=1e-4, atol=1e-4)


def test_a_reduce_mean_over_the_spatial_axes_loads_as_global_average_pool():
    """The dynamo exporter writes adaptive_avg_pool2d(x, 1) as ReduceMean, the legacy one as GlobalAveragePool
    (an INT8 layer): the same net had 24 quantizable groups from one and 28 from the other. A mean over the
    channels (or without keepdims) stays a ReduceMean."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")
    axes = numpy_helper.from_array(np.array([-1, -2], np.int64), "axes")
    channel_axes = numpy_helper.from_array(np.array([1], np.int64), "channel_axes")
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c", "axes"], ["pooled"], name="pool"),
             helper.make_node("ReduceMean", ["c", "channel_axes"], ["channel_mean"], name="channel_mean")]
    graph = helper.make_graph(nodes, "rm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("pooled", TensorProto.FLOAT, ["N", 4, 1, 1]),
                               helper.make_tensor_value_info("channel_mean", TensorProto.FLOAT, ["N", 1, 8, 8])],
                              [w, axes, channel_axes])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    loaded = model_from_proto(proto, label="rm")
    assert [n.op_type for n in loaded.proto.graph.node] == ["Conv", "GlobalAveragePool", "ReduceMean"]
    assert "axes" not in {i.name for i in loaded.proto.graph.initializer}
    x = rng.normal(size=(2, 3, 8, 8)).astype(np.float32)

    def run(model: onnx.ModelProto) -> list[np.ndarray]:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})

    for got, want in zip(run(loaded.proto), run(proto), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_an_average_pool_over_the_whole_map_loads_as_global_average_pool():
    """HF EfficientNet pools with AvgPool2d(1280, ceil_mode=True) over its 4x4 map: ONNX Runtime's fused
    QLinearAveragePool returned the zero point for it (the deployed ORT-form model's logits all 0, while the
    comparison's exposed tensors kept it unfused at 29 dB), and TensorRT-RTX refused the FP32 graph. A window
    covering the map, of known or unknown size, is a GlobalAveragePool; a 2x2 pool stays."""
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 3, 3)).astype(np.float32), "w")

    def pooled(shape: list, kernel: int, ceil: int, strides: int | None = None) -> onnx.ModelProto:
        nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", pads=[1, 1, 1, 1]),
                 helper.make_node("AveragePool", ["c"], ["y"], name="pool", kernel_shape=[kernel, kernel],
                                  strides=[strides or kernel] * 2, ceil_mode=ceil, count_include_pad=1,
                                  pads=[0, 0, 0, 0])]
        graph = helper.make_graph(nodes, "pool", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None] * 4)], [w])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])

    x = rng.normal(size=(2, 3, 4, 4)).astype(np.float32)

    def run(model: onnx.ModelProto) -> np.ndarray:
        return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]

    for shape, kernel, ceil in ((["N", 3, "H", "W"], 640, 1), ([2, 3, 4, 4], 640, 1), ([2, 3, 4, 4], 4, 0)):
        proto = pooled(shape, kernel, ceil)
        loaded = model_from_proto(proto, label="pool")
        assert [n.op_type for n in loaded.proto.graph.node] == ["Conv", "GlobalAveragePool"], (shape, kernel)
        np.testing.assert_allclose(run(loaded.proto), run(proto), rtol=1e-5, atol=1e-6)
    for proto in (pooled([2, 3, 4, 4], 2, 0), pooled(["N", 3, "H", "W"], 32, 1),
                  pooled(["N", 3, "H", "W"], 640, 1, strides=1)):
        assert model_from_proto(proto).proto.graph.node[-1].op_type == "AveragePool"


@pytest.mark.parametrize("written_as", [-1, 0, "?"])
def test_dynamic_axes_written_as_numbers_load_symbolic_and_compare(written_as):
    """paddle2onnx writes dynamic axes as -1 (others as 0): shape inference made a Conv's width 0, and every cut
    sub-model of the comparison refused the real width ("Expected: 0"); ORT refused any data for a 0. It also
    writes "?" for every unknown axis: one shared symbol, it made height and width one dim (PP-OCR's text
    classifier refused its 48x192 crops)."""
    from quantlab.calibrate import calibrate
    from quantlab.compare import CompareOptions, compare
    from quantlab.data import from_arrays
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    proto = models.text_recognizer()
    for vi in list(proto.graph.input) + list(proto.graph.output):
        for d in vi.type.tensor_type.shape.dim:
            if d.HasField("dim_param"):
                d.Clear()
                if written_as == "?":
                    d.dim_param = "?"
                else:
                    d.dim_value = written_as
    model = model_from_proto(proto, label="paddle-style")
    assert model.inputs[0].shape == ("image_0", 3, 48, "image_3")
    for vi in list(model.proto.graph.value_info) + list(model.proto.graph.output):
        dims = vi.type.tensor_type.shape.dim
        assert not any(d.HasField("dim_value") and d.dim_value <= 0 for d in dims), vi.name
    rng = np.random.default_rng(0)
    data = from_arrays({"image": rng.uniform(-1, 1, (6, 3, 48, 64)).astype(np.float32)}, role="validation")
    table = calibrate(model, data, "minmax", batch_size=3).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    row = compare(model, {"int8": written}, data, CompareOptions(batch_size=3, bootstrap=0)).end_to_end.iloc[0]
    assert row["samples"] == 6 and row["cosine"] > 0.99


def test_a_weight_reshaped_by_its_own_shape_is_a_weight_after_loading():
    """tf2onnx's BERT builds a Gemm weight as Reshape(W, Concat(ReduceProd(Gather(Shape(W'))), ...)): Shape was
    never evaluated, so the weight was calibrated as an activation (entropy clipped it at 0.483 of 0.628) and
    coverage said it "saturates in 100 % of samples". Shape of a constant is constant; of an input it is not."""
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.graph import model_from_proto

    rng = np.random.default_rng(0)
    w = rng.normal(0, 0.3, (2, 4, 5)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Shape", ["w3"], ["w_shape"], name="shape_w"),
         helper.make_node("Gather", ["w_shape", "lead"], ["lead_dims"], name="lead_dims", axis=0),
         helper.make_node("ReduceProd", ["lead_dims"], ["rows"], name="rows", keepdims=1),
         helper.make_node("Concat", ["rows", "cols"], ["new_shape"], name="new_shape", axis=0),
         helper.make_node("Reshape", ["w3", "new_shape"], ["w2"], name="flatten_w"),
         helper.make_node("Gemm", ["x", "w2"], ["y"], name="dense"),
         helper.make_node("Shape", ["y"], ["y_shape"], name="shape_y"),
         helper.make_node("Reshape", ["y", "y_shape"], ["out"], name="same_shape")], "tf2onnx_weight",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5])],
        [numpy_helper.from_array(w, "w3"), numpy_helper.from_array(np.array([0, 1], np.int64), "lead"),
         numpy_helper.from_array(np.array([5], np.int64), "cols")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    inits = {i.name: numpy_helper.to_array(i) for i in model.proto.graph.initializer}
    np.testing.assert_array_equal(inits["w2"], w.reshape(8, 5))
    assert "shape_y" in {n.name for n in model.proto.graph.node}  # an activation's shape stays computed
    x = rng.normal(size=(4, 8)).astype(np.float32)
    assert "w2" not in calibrate(model, from_arrays({"x": x}), "entropy").tables["entropy"].ranges


def test_model_local_functions_are_inlined_so_their_layers_can_be_quantized():
    """torch's export_modules_as_functions writes each block as a local function: one opaque node per call, its
    convs without an INT8 form. Loaded, the calls are inlined (same outputs, unique node names) and an INT8
    write quantizes the convs inside."""
    from onnx import TensorProto, helper, numpy_helper

    import models
    from quantlab.calibrate import calibrate
    from quantlab.data import from_arrays
    from quantlab.plan import uniform_plan
    from quantlab.quantize import WriteOptions, write_model

    rng = np.random.default_rng(0)
    block = helper.make_function(
        "local", "Block", ["x", "w"], ["y"],
        [helper.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1], name="conv"),
         helper.make_node("Relu", ["c"], ["r"], name="relu"), helper.make_node("Add", ["r", "x"], ["y"], name="add")],
        [helper.make_opsetid("", 17)])
    weights = [numpy_helper.from_array((rng.standard_normal((4, 4, 3, 3)) * 0.2).astype(np.float32), f"w{k}")
               for k in range(2)]
    graph = helper.make_graph(
        [helper.make_node("Block", ["x", "w0"], ["b0"], domain="local", name="/b0/Block"),
         helper.make_node("Block", ["b0", "w1"], ["b1"], domain="local", name="/b1/Block"),
         helper.make_node("ReduceMean", ["b1"], ["y"], axes=[2, 3], keepdims=0, name="pool")],
        "functions", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], weights)
    proto = helper.make_model(graph, functions=[block], opset_imports=[helper.make_opsetid("", 17),
                                                                       helper.make_opsetid("local", 1)])
    proto.ir_version = 8
    model = model_from_proto(proto)
    assert not model.proto.functions and [n.op_type for n in model.proto.graph.node].count("Conv") == 2
    names = [n.name for n in model.proto.graph.node]
    assert len(set(names)) == len(names) and all(names)
    x = rng.standard_normal((6, 4, 8, 8)).astype(np.float32)
    np.testing.assert_allclose(models.run_ort(model.proto, {"x": x})["y"], models.run_ort(proto, {"x": x})["y"],
                               rtol=1e-5, atol=1e-6)
    table = calibrate(model, from_arrays({"x": x}), "minmax", batch_size=3).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    convs = [n for n in written.proto.graph.node if n.op_type == "Conv"]
    producers = {o: n.op_type for n in written.proto.graph.node for o in n.output}
    assert len(convs) == 2 and all(producers.get(c.input[1]) == "DequantizeLinear" for c in convs)


def _resize_model(op: str, opset: int, mode: str, scales: list[float]) -> onnx.ModelProto:
    """x[1, 2, 6, 6] -> Resize-10 / Upsample-9 (scales as an initializer) or Upsample-7 (scales attribute)."""
    if op == "Upsample" and opset < 9:
        nodes, inits = [helper.make_node("Upsample", ["x"], ["y"], name="up", mode=mode, scales=scales)], []
    else:
        nodes = [helper.make_node(op, ["x", "s"], ["y"], name="up", mode=mode)]
        inits = [numpy_helper.from_array(np.array(scales, np.float32), "s")]
    graph = helper.make_graph(nodes, "resize", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [int(d * f) for d, f in
                                                                                      zip((1, 2, 6, 6), scales)])],
                              inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    proto.ir_version = 6
    return proto


@pytest.mark.parametrize("op,opset", [("Resize", 10), ("Upsample", 9), ("Upsample", 7)])
@pytest.mark.parametrize("mode,scales", [("linear", [1.0, 1.0, 3.0, 3.0]), ("linear", [1.0, 1.0, 2.0, 1.5]),
                                         ("nearest", [1.0, 1.0, 3.0, 3.0]), ("nearest", [1.0, 1.0, 2.0, 1.5])])
def test_an_upgraded_resize_computes_what_the_file_computes(op, opset, mode, scales):
    """The version converter keeps a Resize-10's attributes, and opset 11 gave its missing grid attribute another
    default (half_pixel): a bilinear upsample moved by half a pixel (1.6 on unit-variance data), and every figure
    was measured against the changed model. Loaded, the model computes on ONNX Runtime what the file computes."""
    proto = _resize_model(op, opset, mode, scales)
    model = model_from_proto(proto, label="old")
    assert model.upgraded_from_opset == opset
    x = {"x": np.random.default_rng(0).normal(size=(1, 2, 6, 6)).astype(np.float32)}
    np.testing.assert_allclose(models.run_ort(model.proto, x)["y"], models.ort_session(proto).run(None, x)[0],
                               atol=1e-6)


def test_a_hardmax_whose_meaning_the_upgrade_changes_is_refused():
    """Below opset 13 Hardmax flattens its input at ``axis``; from 13 it works along ``axis`` alone: upgraded as is,
    it returns another one-hot. Its last axis means the same either way."""
    def hardmax(axis: int) -> onnx.ModelProto:
        graph = helper.make_graph([helper.make_node("Hardmax", ["x"], ["y"], name="pick", axis=axis)], "h",
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)])
        proto.ir_version = 6
        return proto

    with pytest.raises(ModelError, match=r"Hardmax 'pick' \(axis 1\).*Re-export the model with opset_version>=13"):
        model_from_proto(hardmax(1), label="old")
    for axis in (-1, 2):
        model = model_from_proto(hardmax(axis), label="old")
        x = {"x": np.random.default_rng(0).normal(size=(2, 3, 4)).astype(np.float32)}
        np.testing.assert_array_equal(models.run_ort(model.proto, x)["y"],
                                      models.ort_session(hardmax(axis)).run(None, x)[0])
