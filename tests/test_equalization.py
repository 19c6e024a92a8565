"""Cross-layer equalization and SmoothQuant: float rewrites that are exact in FP32 and help INT8.

Exactness is checked against a bound derived from float32 rounding, not from what one CPU
printed: each layer of either model rounds every product-sum (fan-in K terms) and the rescaled
weights, biases and clip bounds once each, so the difference of the two models' outputs is at
most 2 * L * (K + 3) * u * M, u = 2**-24, L layers, M the output of the "absolute" network
(|W|, |b|, |x|, every activation the identity on non-negative values), which bounds every
intermediate magnitude and its propagation (ReLU, Min, pooling are 1-Lipschitz).
"""

from __future__ import annotations

import dataclasses

import models
import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from quantlab.backends import get_backend
from quantlab.calibrate import calibrate
from quantlab.data import from_arrays
from quantlab.errors import CalibrationError, QuantlabError
from quantlab.graph import model_from_proto, serialize
from quantlab.plan import uniform_plan
from quantlab.quantize import (
    Equalization,
    SmoothQuant,
    WriteOptions,
    apply_smoothquant,
    equalize_model,
    measure_bias_correction,
    measure_smoothquant,
    prepare_model,
    write_model,
)

U = 2.0 ** -24


def _run(proto: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    runner = get_backend("ort").build(proto)
    try:
        out = runner.run(feeds)
    finally:
        runner.close()
    return np.asarray(out[proto.graph.output[0].name], dtype=np.float64)


def _absolute_network(proto: onnx.ModelProto) -> onnx.ModelProto:
    """|W|, |b| everywhere and Clip / LayerNorm replaced by what bounds them on non-negative inputs."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for init in out.graph.initializer:
        arr = numpy_helper.to_array(init)
        if arr.dtype.kind == "f":
            init.CopyFrom(numpy_helper.from_array(np.abs(arr), init.name))
    for node in out.graph.node:
        if node.op_type in ("Clip", "Min"):
            node.op_type = "Relu"
            del node.input[1:]
    return out


def _fan_in(proto: onnx.ModelProto) -> tuple[int, int]:
    """(layers with weights, largest number of terms in one output's sum)."""
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    fans = [int(np.prod(inits[n.input[1]].shape[1:])) if n.op_type == "Conv" else int(inits[n.input[1]].shape[-1])
            for n in proto.graph.node if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in inits]
    return len(fans), max(fans)


def _rounding_bound(proto: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    layers, k = _fan_in(proto)
    magnitude = _run(_absolute_network(proto), {"input": np.abs(x)})
    return 2 * layers * (k + 3) * U * magnitude


def _inputs(n: int = 6, size: int = 12, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 3, size, size)).astype(np.float32)


def _dsn():
    return model_from_proto(models.depthwise_separable_net(), label="depthwise_separable_net")


@pytest.mark.parametrize("growth", [1.0, float("inf")])
def test_equalized_fp32_model_equals_the_original_within_float32_rounding(growth):
    model = _dsn()
    eq = equalize_model(model, Equalization(max_activation_growth=growth))
    assert len(eq.pairs) == 4 and eq.converged
    x = _inputs()
    ref, got = _run(model.proto, {"input": x}), _run(eq.model.proto, {"input": x})
    bound = _rounding_bound(model.proto, x)
    assert np.all(np.abs(got - ref) <= bound), float(np.max(np.abs(got - ref) - bound))
    # the weights really changed (a no-op would pass the check above too)
    before = {i.name: numpy_helper.to_array(i) for i in model.proto.graph.initializer}
    after = {i.name: numpy_helper.to_array(i) for i in eq.model.proto.graph.initializer}
    assert np.max(np.abs(after["dw1_w"] - before["dw1_w"])) > 0.01 * np.max(np.abs(before["dw1_w"]))


def _pair_ranges(proto: onnx.ModelProto, first: str, second: str) -> tuple[np.ndarray, np.ndarray]:
    w = {i.name: numpy_helper.to_array(i).astype(np.float64) for i in proto.graph.initializer}
    w1, w2 = w[f"{first}_w"], w[f"{second}_w"]
    c = w1.shape[0]
    r1 = np.abs(w1).reshape(c, -1).max(axis=1)
    depthwise = w2.shape[1] == 1 and w2.shape[0] == c
    r2 = np.abs(w2).reshape(c, -1).max(axis=1) if depthwise else np.abs(np.moveaxis(w2, 1, 0)).reshape(c, -1).max(1)
    return r1, r2


def test_unbounded_equalization_gives_both_convs_of_every_pair_the_same_channel_ranges():
    """Nagel's fixed point: after the sweeps every pair's s_c is 1, i.e. r1_c = r2_c (up to the tolerance)."""
    model = _dsn()
    eq = equalize_model(model, Equalization(max_activation_growth=float("inf")))
    spread_before = []
    for first, second in [("stem", "dw1"), ("dw1", "pw1"), ("pw1", "dw2"), ("dw2", "proj")]:
        r1, r2 = _pair_ranges(eq.model.proto, first, second)
        np.testing.assert_allclose(r1, r2, rtol=1e-5)
        b1, b2 = _pair_ranges(model.proto, first, second)
        spread_before.append(np.max(np.abs(np.log(b1 / b2))))
    assert max(spread_before) > np.log(3)  # the planted model was far from equal


def test_bounded_growth_never_enlarges_an_activation_channel():
    model = _dsn()
    eq = equalize_model(model, Equalization())
    bounds = {i.name: numpy_helper.to_array(i) for i in eq.model.proto.graph.initializer
              if i.name.endswith("/equalized_bound")}
    assert len(bounds) == 3  # stem_relu6, pw1_relu6, dw2_relu6
    for arr in bounds.values():
        assert arr.shape[1:] == (1, 1) and np.all(arr <= np.float32(6.0))
        assert np.min(arr) < 6.0 * 0.9  # channels did shrink


def test_names_kept_rescaled_tensors_renamed_and_relu6_split():
    model = _dsn()
    eq = equalize_model(model)
    nodes = {n.name: n for n in eq.model.proto.graph.node}
    assert {n.name for n in model.proto.graph.node} <= set(nodes)
    assert nodes["stem_relu6"].op_type == "Relu" and nodes["dw1_relu"].op_type == "Relu"
    assert sorted(n.op_type for n in eq.model.proto.graph.node if n.name not in {m.name for m in model.proto.graph.node}) \
        == ["Min", "Min", "Min"]
    produced = {o for n in eq.model.proto.graph.node for o in n.output}
    rescaled = {"stem", "stem_act", "dw1", "dw1_act", "pw1", "pw1_act", "dw2", "dw2_act"}
    assert not rescaled & produced  # no original name carries a rescaled value
    assert {"proj", "pooled", "logits"} <= produced
    assert eq.model.sha256 != model.sha256
    again = equalize_model(model)
    assert serialize(again.model.proto) == serialize(eq.model.proto)  # deterministic, byte for byte


def test_skip_mode_leaves_pairs_joined_by_a_bounded_clip_alone():
    eq = equalize_model(_dsn(), Equalization(clip="skip"))
    assert eq.pairs == (("dw1", "dw1_relu", "pw1"),)
    assert not any(n.op_type == "Min" for n in eq.model.proto.graph.node)


def test_settings_are_checked():
    with pytest.raises(QuantlabError, match="clip mode"):
        Equalization(clip="relu")  # type: ignore[arg-type]
    with pytest.raises(QuantlabError, match="max_activation_growth"):
        Equalization(max_activation_growth=0.5)


def _calibrated(model, prepared_model, x):
    cal = from_arrays({next(iter(model.input_names)): x})
    return calibrate(prepared_model, cal, ["minmax"]).tables["minmax"], cal


def _sqnr(ref: np.ndarray, out: np.ndarray) -> float:
    return float(10 * np.log10((ref ** 2).sum() / ((ref - out) ** 2).sum()))


def test_equalization_makes_per_tensor_int8_closer_to_fp32_and_provenance_says_so():
    model = _dsn()
    x_cal, x_val = _inputs(32, seed=2), _inputs(16, seed=3)
    eq_opts = WriteOptions(target="tensorrt", per_channel_weights=False, equalization=Equalization())
    prepared = prepare_model(model, eq_opts)
    plain_table, _ = _calibrated(model, model, x_cal)
    eq_table, _ = _calibrated(model, prepared.model, x_cal)
    ref = _run(model.proto, {"input": x_val})
    plain = write_model(model, uniform_plan("int8"), plain_table, WriteOptions(per_channel_weights=False))
    equalized = write_model(model, uniform_plan("int8"), eq_table, eq_opts)
    before = _sqnr(ref, _run(plain.proto, {"input": x_val}))
    after = _sqnr(ref, _run(equalized.proto, {"input": x_val}))
    assert after > before + 3.0, (before, after)
    meta = equalized.provenance.meta
    assert meta["source_sha256"] == model.sha256
    assert meta["prepared"]["equalization"]["equalized_sha256"] == prepared.model.sha256
    assert meta["table_model_sha256"] == prepared.model.sha256
    assert meta["options"]["equalization"]["clip"] == "split"
    assert equalized.plan.groups == uniform_plan_groups(model)  # the plan still names the original groups
    # the Min a split Clip adds stays float32 between the INT8 convs
    mins = [g for g, p in equalized.provenance.group_precision.items() if g.endswith("/equalized_max")]
    assert len(mins) == 3 and all(equalized.provenance.group_precision[g] == "fp32" for g in mins)


def uniform_plan_groups(model):
    from quantlab.plan import resolve_plan

    return resolve_plan(uniform_plan("int8"), model.proto).groups


def test_a_table_of_the_unequalized_model_is_refused_with_the_flag_to_use():
    model = _dsn()
    table, cal = _calibrated(model, model, _inputs(8))
    opts = WriteOptions(equalization=Equalization())
    with pytest.raises(CalibrationError, match="--equalize"):
        write_model(model, uniform_plan("int8"), table, opts)
    with pytest.raises(CalibrationError, match="--equalize"):
        measure_bias_correction(model, table, cal, opts)


def test_bias_correction_on_top_of_equalization_is_measured_on_the_equalized_model():
    model = _dsn()
    x = _inputs(16, seed=4)
    opts = WriteOptions(per_channel_weights=False, equalization=Equalization())
    table, cal = _calibrated(model, prepare_model(model, opts).model, x)
    bc = measure_bias_correction(model, table, cal, opts)
    assert {name for name, _ in bc.layers} >= {"stem", "dw1", "pw1", "dw2", "proj"}
    written = write_model(model, uniform_plan("int8"), table, dataclasses.replace(opts, bias_correction=bc))
    assert set(written.provenance.meta["bias_correction"]["applied"]) >= {"dw1", "dw2"}
    with pytest.raises(QuantlabError, match="measured for"):
        write_model(model, uniform_plan("int8"), table,
                    dataclasses.replace(opts, per_channel_weights=True, bias_correction=bc))
    with pytest.raises(CalibrationError, match="rewritten with these write options"):
        write_model(model, uniform_plan("int8"), table,
                    dataclasses.replace(opts, equalization=Equalization(clip="skip"), bias_correction=bc))


def test_tensorrt_rtx_parses_and_builds_the_equalized_qdq_model():
    pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed: pip install 'quantlab[tensorrt-rtx]'")
    model = _dsn()
    opts = WriteOptions(target="tensorrt", per_channel_weights=False, equalization=Equalization())
    table, _ = _calibrated(model, prepare_model(model, opts).model, _inputs(8))
    written = write_model(model, uniform_plan("int8"), table, opts)
    engine = get_backend("tensorrt-rtx").build_engine(written.proto, label="depthwise_separable_net (equalized)")
    assert isinstance(engine, bytes) and len(engine) > 10_000


# --------------------------------------------------------------------------- SmoothQuant


def _block():
    return model_from_proto(models.smoothquant_block(), label="smoothquant_block")


def _tokens(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 1, (n, 8, 16)).astype(np.float32)


def test_smoothquant_folds_into_the_layernorm_and_keeps_fp32_outputs():
    model = _block()
    x = _tokens(16, 5)
    sq = measure_smoothquant(model, from_arrays({"x": x}), alpha=0.5)
    assert [name for name, _ in sq.activations] == ["ln"]  # only the LayerNorm output has outlier channels
    smoothed = apply_smoothquant(model, sq)
    ops = [n.op_type for n in smoothed.proto.graph.node]
    assert ops == [n.op_type for n in model.proto.graph.node]  # folded: nothing inserted
    s = np.asarray(sq.activations[0][1])
    assert s[[3, 11]].min() > 3 * np.median(s)
    ref, got = _run(model.proto, {"x": x}), _run(smoothed.proto, {"x": x})
    # LayerNorm's own float32 rounding (normalised values times gamma/s) is the largest term here
    np.testing.assert_allclose(got, ref, rtol=0, atol=64 * 16 * U * np.abs(ref).max() + 1e-6)
    with pytest.raises(QuantlabError, match="measured on the model"):
        apply_smoothquant(smoothed, sq)


def test_smoothquant_inserts_a_mul_when_the_producer_cannot_absorb_it():
    proto = models.mlp_attention()  # channel 2 of x is made an outlier through the data below
    model = model_from_proto(proto, label="mlp_attention")
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (8, 8, 16)).astype(np.float32)
    x[..., 2] *= 50
    mask = np.zeros((8, 1, 8), np.float32)
    sq = measure_smoothquant(model, from_arrays({"x": x, "mask": mask}), alpha=0.5)
    assert [name for name, _ in sq.activations] == ["x"]
    smoothed = apply_smoothquant(model, sq)
    muls = [n for n in smoothed.proto.graph.node if n.op_type == "Mul"]
    assert len(muls) == 1 and muls[0].input[0] == "x"
    readers = [n.name for n in smoothed.proto.graph.node if muls[0].output[0] in n.input]
    assert sorted(readers) == ["k_proj", "q_proj", "v_proj"]
    ref = _run(model.proto, {"x": x, "mask": mask})
    got = _run(smoothed.proto, {"x": x, "mask": mask})
    np.testing.assert_allclose(got, ref, rtol=0, atol=64 * 16 * U * np.abs(ref).max() + 1e-6)


def test_smoothquant_makes_per_tensor_int8_of_an_outlier_activation_closer_to_fp32():
    model = _block()
    x_cal, x_val = _tokens(32, 6), _tokens(16, 7)
    cal = from_arrays({"x": x_cal})
    sq = measure_smoothquant(model, cal, alpha=0.5)
    opts = WriteOptions(target="tensorrt", smoothquant=sq)
    prepared = prepare_model(model, opts)
    plain_table = calibrate(model, cal, ["minmax"]).tables["minmax"]
    sq_table = calibrate(prepared.model, cal, ["minmax"]).tables["minmax"]
    ref = _run(model.proto, {"x": x_val})
    plain = write_model(model, uniform_plan("int8"), plain_table, WriteOptions(target="tensorrt"))
    smooth = write_model(model, uniform_plan("int8"), sq_table, opts)
    before, after = _sqnr(ref, _run(plain.proto, {"x": x_val})), _sqnr(ref, _run(smooth.proto, {"x": x_val}))
    assert after > before + 3.0, (before, after)
    assert smooth.provenance.meta["prepared"]["smoothquant"]["alpha"] == 0.5
    assert smooth.provenance.meta["prepared"]["smoothquant"]["smoothed_sha256"] == prepared.model.sha256


def test_smoothquant_alpha_is_checked_and_no_outliers_means_no_change():
    with pytest.raises(QuantlabError, match="alpha"):
        measure_smoothquant(_block(), from_arrays({"x": _tokens(2, 0)}), alpha=1.5)
    model = model_from_proto(models.smoothquant_block(outlier_gain=1.0), label="no outliers")
    sq = measure_smoothquant(model, from_arrays({"x": _tokens(8, 1)}))
    assert sq.activations == () and isinstance(sq, SmoothQuant)
    assert apply_smoothquant(model, sq) is model


# --------------------------------------------------------------------------- command line


def _cli_setup(tmp_path, monkeypatch, proto, arrays):
    from quantlab.cli import calibrate as cli_calibrate

    model_path = tmp_path / "model.onnx"
    onnx.save(proto, model_path)
    manifest = tmp_path / "set.toml"
    manifest.write_text("# stands for the in-memory set below\n")
    monkeypatch.setattr(cli_calibrate, "_load_dataset", lambda path: from_arrays(arrays))
    return model_path, manifest


def test_cli_calibrate_and_build_with_equalize(tmp_path, monkeypatch, capsys):
    import json

    from quantlab.cli import main
    from quantlab.table import read_table

    model_path, manifest = _cli_setup(tmp_path, monkeypatch, models.depthwise_separable_net(),
                                      {"input": _inputs(8)})
    cal = tmp_path / "cal"
    assert main(["calibrate", str(model_path), "--calib", str(manifest), "--method", "minmax", "--equalize",
                 "--out", str(cal), "--no-progress"]) == 0
    assert "equalized 4 conv pair(s)" in capsys.readouterr().err
    table = read_table(cal / "calib_minmax.json")
    run = json.loads((cal / "calibrate_run.json").read_text())
    assert table.model_sha256 == run["calibrated_model_sha256"] != run["model_sha256"]
    assert table.settings["prepared"]["equalization"]["pair_count"] == 4
    out = tmp_path / "build"
    assert main(["build", str(model_path), "--table", str(cal / "calib_minmax.json"), "--equalize",
                 "--per-tensor-weights", "--target", "tensorrt", "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["meta"]["prepared"]["equalization"]["equalized_sha256"] == table.model_sha256
    assert prov["meta"]["source_sha256"] == run["model_sha256"]
    capsys.readouterr()
    # the same table without --equalize: exit 2, the file and the missing flag named, nothing written
    assert main(["build", str(model_path), "--table", str(cal / "calib_minmax.json"),
                 "--out", str(tmp_path / "b2")]) == 2
    err = capsys.readouterr().err
    assert "calib_minmax.json" in err and "--equalize" in err
    assert not (tmp_path / "b2").exists()


def test_cli_calibrate_smoothquant_writes_scales_that_build_reuses(tmp_path, monkeypatch, capsys):
    import json

    from quantlab.cli import main

    model_path, manifest = _cli_setup(tmp_path, monkeypatch, models.smoothquant_block(), {"x": _tokens(16, 8)})
    cal = tmp_path / "cal"
    assert main(["calibrate", str(model_path), "--calib", str(manifest), "--method", "minmax",
                 "--smoothquant", "0.5", "--out", str(cal), "--no-progress"]) == 0
    assert (cal / "smoothquant.json").is_file()
    out = tmp_path / "build"
    assert main(["build", str(model_path), "--table", str(cal / "calib_minmax.json"), "--smoothquant-scales",
                 str(cal / "smoothquant.json"), "--out", str(out)]) == 0
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["meta"]["prepared"]["smoothquant"]["activations"] == ["ln"]
    capsys.readouterr()
    assert main(["calibrate", str(model_path), "--calib", str(manifest), "--smoothquant", "2",
                 "--out", str(tmp_path / "c2"), "--no-progress"]) == 2
    assert "[0, 1]" in capsys.readouterr().err


# --------------------------------------------------------------------------- experiments


def test_experiment_keys_parse_and_are_checked(tmp_path):
    from quantlab.errors import ExperimentError
    from quantlab.experiment import parse_experiment

    for name in ("model.onnx", "calib.toml", "val.toml"):
        (tmp_path / name).write_text("x")
    head = 'model = { path = "model.onnx" }\ndata = { calibration = "calib.toml", validation = "val.toml" }\n'
    cfg = parse_experiment(head + "[calibrate]\nequalize = true\nsmoothquant = 0.5\n[search]\nbias_correction = false\n",
                           source=tmp_path / "e.toml")
    assert cfg.equalize and cfg.smoothquant == 0.5 and not cfg.search_bias_correction
    assert cfg.settings()["rewrites"] == {"equalize": True, "smoothquant": 0.5}
    plain = parse_experiment(head, source=tmp_path / "e.toml")
    assert not plain.equalize and plain.smoothquant is None and plain.search_bias_correction
    assert "rewrites" not in plain.settings()
    with pytest.raises(ExperimentError, match="smoothquant"):
        parse_experiment(head + "[calibrate]\nsmoothquant = 1.5\n", source=tmp_path / "e.toml")


def test_experiment_with_equalization_calibrates_builds_and_searches_the_rewritten_model(tmp_path):
    import json

    from quantlab.experiment import load_experiment, run_experiment

    onnx.save(models.depthwise_separable_net(), tmp_path / "model.onnx")
    np.savez(tmp_path / "calib.npz", input=_inputs(24, seed=11))
    np.savez(tmp_path / "val.npz", input=_inputs(16, seed=12))
    for role, name in (("calibration", "calib"), ("validation", "val")):
        (tmp_path / f"{name}.toml").write_text(
            f'role = "{role}"\nshuffle = false\n[[source]]\nkind = "npz"\npath = "{name}.npz"\nbatched = true\n')
    path = tmp_path / "cle.toml"
    path.write_text('name = "cle"\nthreshold = "cosine>=0.99999"\n[model]\npath = "model.onnx"\n'
                    '[data]\ncalibration = "calib.toml"\nvalidation = "val.toml"\n'
                    '[calibrate]\nmethods = ["minmax"]\nequalize = true\n[candidates]\nfp16 = false\n'
                    '[search]\nenabled = true\nbudget = 3\n')
    result = run_experiment(load_experiment(path), reports_dir=tmp_path / "reports")
    report = tmp_path / "reports" / "cle"
    build = next(s.path for s in result.stages if s.name.startswith("build-int8"))
    prov = json.loads((build / "provenance.json").read_text())
    assert prov["meta"]["prepared"]["equalization"]["pair_count"] == 4
    assert any(m.startswith("float rewrites before calibration: cross-layer equalization of 4") for m in result.messages)
    search = next(s.path for s in result.stages if s.name == "search")
    settings = json.loads((search / "search.json").read_text())["settings"]
    assert isinstance(settings["bias_correction"], dict) and settings["bias_correction"]["layers"] >= 5
    assert any(m.startswith("search: bias correction on") for m in result.messages)
    assert (report / "index.html").is_file()


def _npz_sets(folder, arrays_cal, arrays_val):
    np.savez(folder / "calib.npz", **arrays_cal)
    np.savez(folder / "val.npz", **arrays_val)
    for role, name in (("calibration", "calib"), ("validation", "val")):
        (folder / f"{name}.toml").write_text(
            f'role = "{role}"\nshuffle = false\n[[source]]\nkind = "npz"\npath = "{name}.npz"\nbatched = true\n')
    return folder / "calib.toml", folder / "val.toml"


def test_cli_search_with_equalize_searches_the_equalized_model_with_bias_correction(tmp_path, capsys):
    import json

    from quantlab.cli import main

    onnx.save(models.depthwise_separable_net(), tmp_path / "model.onnx")
    calib, val = _npz_sets(tmp_path, {"input": _inputs(16, seed=13)}, {"input": _inputs(12, seed=14)})
    out = tmp_path / "search"
    code = main(["search", str(tmp_path / "model.onnx"), "--calib", str(calib), "--data", str(val),
                 "--threshold", "cosine>=0.99999", "--equalize", "--per-tensor-weights", "--budget", "2",
                 "--out", str(out)])
    assert code in (0, 1)
    printed = capsys.readouterr().out
    record = json.loads((out / "search.json").read_text())
    correction = record["settings"]["bias_correction"]  # measured on the equalized model; applied if it helps
    assert "  note: bias correction " in printed  # the search says whether it applied it
    if isinstance(correction, dict):  # kept: no further from the threshold with it (SQNR decides a tie)
        with_it, without = correction["threshold_margin_with"], correction["threshold_margin_without"]
        assert correction["layers"] >= 5 and (with_it > without or (
            with_it == without and correction["int8_sqnr_db_with"] >= correction["int8_sqnr_db_without"]))
    else:
        assert correction.startswith("measured, not applied: it ")
    ops = [n.op_type for n in onnx.load(out / "final" / "model.onnx").graph.node]
    assert ops.count("Min") == 3  # the split ReLU6s of the equalized model
    # the plan names the rewrite's Min nodes too; build --equalize takes it for the original model
    searched = json.loads((out / "plan.json").read_text())["overrides"]
    assert any(k.endswith("/equalized_max") for k in searched)
    assert main(["calibrate", str(tmp_path / "model.onnx"), "--calib", str(calib), "--method", "minmax",
                 "--equalize", "--no-progress", "--out", str(tmp_path / "cal")]) == 0
    assert main(["build", str(tmp_path / "model.onnx"), "--table", str(tmp_path / "cal" / "calib_minmax.json"),
                 "--plan", str(out / "plan.json"), "--equalize", "--per-tensor-weights",
                 "--out", str(tmp_path / "b")]) == 0
    built = json.loads((tmp_path / "b" / "plan.json").read_text())["overrides"]
    assert built == {k: v for k, v in searched.items() if not k.endswith("/equalized_max")}


def test_smoothquant_scales_the_columns_of_a_transposed_gemm_weight_exactly():
    model = _block()
    x = _tokens(8, 9)
    x[..., 5] *= 50  # the residual carries it into the pooled input of the Gemm head (transB=1)
    sq = measure_smoothquant(model, from_arrays({"x": x}))
    assert [name for name, _ in sq.activations] == ["ln", "pooled"]
    smoothed = apply_smoothquant(model, sq)
    head = next(n for n in smoothed.proto.graph.node if n.name == "head")
    assert head.input[0] == "pooled/smoothed"
    w0 = next(numpy_helper.to_array(i) for i in model.proto.graph.initializer if i.name == "head_w")
    w1 = next(numpy_helper.to_array(i) for i in smoothed.proto.graph.initializer if i.name == "head_w")
    s = np.asarray(dict(sq.activations)["pooled"])
    np.testing.assert_allclose(w1, w0 * s[None, :].astype(np.float32), rtol=2 * U)
    ref, got = _run(model.proto, {"x": x}), _run(smoothed.proto, {"x": x})
    np.testing.assert_allclose(got, ref, rtol=0, atol=64 * 16 * U * np.abs(ref).max() + 1e-6)


def test_ort_form_of_an_equalized_model_runs_and_stays_close():
    model = _dsn()
    x_cal, x_val = _inputs(32, seed=2), _inputs(16, seed=3)
    opts = WriteOptions(target="ort", per_channel_weights=False, equalization=Equalization())
    table, _ = _calibrated(model, prepare_model(model, opts).model, x_cal)
    plain_table, _ = _calibrated(model, model, x_cal)
    ref = _run(model.proto, {"input": x_val})
    eq = _sqnr(ref, _run(write_model(model, uniform_plan("int8"), table, opts).proto, {"input": x_val}))
    plain = _sqnr(ref, _run(write_model(model, uniform_plan("int8"), plain_table,
                                        WriteOptions(target="ort", per_channel_weights=False)).proto, {"input": x_val}))
    assert eq > plain, (plain, eq)


def test_comparing_the_original_with_an_equalized_build_skips_only_the_rescaled_islands():
    """Per-layer comparison of an equalized INT8 build against the ORIGINAL model: groups that read a rescaled
    tensor (it exists only in the candidate) are left out of the local mode with a note; the rest is compared."""
    from quantlab.compare import CompareOptions, compare

    model = _dsn()
    opts = WriteOptions(target="tensorrt", per_channel_weights=False, equalization=Equalization())
    table, _ = _calibrated(model, prepare_model(model, opts).model, _inputs(8))
    written = write_model(model, uniform_plan("int8"), table, opts)
    result = compare(model, {"int8": written}, from_arrays({"input": _inputs(4, seed=3)}),
                     CompareOptions(batch_size=2, bootstrap=0))
    assert any("exists only in the candidate" in w for w in result.warnings)
    local = result.per_layer[result.per_layer["candidate"] == "int8"]
    assert len(local) > 0 and result.end_to_end.loc[0, "cosine"] > 0.9


def test_a_relu6_bound_held_by_a_value_float_constant_is_equalized_like_an_initializer():
    """Exporters write Clip's bounds as initializers or as Constant nodes (``value`` or ``value_float``):
    all are the same ReLU6 to equalization (quantlab.folding.clip_bounds)."""
    proto = models.depthwise_separable_net()
    proto.graph.node.insert(0, onnx.helper.make_node("Constant", [], ["six_c"], value_float=6.0))
    for node in proto.graph.node:
        if node.name == "pw1_relu6":
            node.input[2] = "six_c"
    constant = equalize_model(model_from_proto(proto, label="dsn_constant_six"))
    reference = equalize_model(_dsn())
    assert constant.pairs == reference.pairs and ("pw1", "pw1_relu6", "dw2") in constant.pairs
    assert sum(n.op_type == "Min" for n in constant.model.proto.graph.node) == 3
