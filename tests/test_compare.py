from __future__ import annotations

import dataclasses
import json
import math
import re
from fractions import Fraction

import models
import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
from onnx import TensorProto, helper, numpy_helper

from quantlab.calibrate import calibrate
from quantlab.cli import main
from quantlab.backends import get_backend
from quantlab.backends.ort import environment_options
from quantlab.compare import CompareOptions, compare, load_candidate, load_comparison
from quantlab.data import from_arrays, summarize
from quantlab.errors import BackendError, CompareError, ThresholdError
from quantlab.graph import model_from_proto, serialize, with_outputs
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, save_written, write_model

N_VAL = 48
EXACT = {"qdq_fusion": False}
"""Q/DQ as written (no integer-kernel fusion) in the comparator and in the tests' own sessions alike."""


# --------------------------------------------------------------------------- fixtures and helpers


def _table(model, proto, n=16):
    return calibrate(model, from_arrays(models.random_inputs(proto, n, seed=11)), ["minmax"]).tables["minmax"]


@pytest.fixture(scope="module")
def setup():
    proto = models.residual_net()
    model = model_from_proto(proto, label="residual_net")
    table = _table(model, proto)
    written = {
        "int8": write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt")),
        "int8-ort": write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort")),
        "fp16": write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=True)),
    }
    feeds = models.random_inputs(proto, N_VAL, seed=3)
    labels = np.random.default_rng(0).integers(0, 10, N_VAL)
    val = from_arrays(feeds, labels=labels, role="validation", name="val")
    return {"model": model, "table": table, "written": written, "feeds": feeds, "labels": labels, "val": val}


@pytest.fixture(scope="module")
def result(setup):
    return compare(setup["model"], setup["written"], setup["val"],
                   CompareOptions(batch_size=8, bootstrap=300, backend_options=EXACT))


def _session(proto, outputs=()):
    if outputs:
        proto = with_outputs(proto, outputs)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    return ort.InferenceSession(serialize(proto), so, providers=["CPUExecutionProvider"])


def _run_all(proto, feeds, outputs=None, batch=8):
    s = _session(proto, outputs or ())
    names = outputs or [o.name for o in s.get_outputs()]
    n = next(iter(feeds.values())).shape[0]
    parts = [s.run(names, {k: v[i:i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return {name: np.concatenate([p[j] for p in parts]) for j, name in enumerate(names)}


def _sqnr(r, c):
    r, c = r.astype(np.float64).ravel(), c.astype(np.float64).ravel()
    return 10 * np.log10((r @ r) / ((r - c) @ (r - c)))


def _mcnemar(b, c):
    n, k = b + c, min(b, c)
    if n == 0:
        return 1.0
    return float(min(Fraction(1), 2 * Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)))


FLOAT32_DRIFT = 4 * 8 * math.sqrt(3 * 9 + 8 * 9 + 8 * 9 + 9 + 16 * 16 + 8) * 2.0 ** -24
"""How far float32 rounding alone can move a relative error ||c - r|| / ||r|| (or an angle) of these models.

Two ONNX Runtime runs of one model that differ in batch size, exposed outputs, fusions, kernels (AVX2,
AVX-512, VNNI) or thread count differ only in float32 rounding. Each run's tensor is within
lambda * sqrt(n) * u (relative) of the exact one, for any summation order: n = multiply-adds on
residual_net's longest path (3*9, 8*9, 8*9 conv taps, 9 depthwise taps, a 16x16 mean, 8 Gemm terms; the
other models here are shallower), u = 2**-24, lambda = 8 (probabilistic rounding analysis, Higham & Mary
2019, with room for sums that cancel). The noise e = c - r of two runs then differs by at most the four
tensors' drifts (triangle inequality: | ||e_a|| - ||e_b|| | <= ||r_a - r_b|| + ||c_a - c_b||), and so does
the angle between c and r. An int8 / float16 rounding that flips between runs moves |e| of its own element
by no more than the drift (the distance to a grid is 1-Lipschitz); later layers see it with random sign.
"""


def _relative_error(sqnr_db):
    """||c - r|| / ||r|| from an SQNR in dB (the quantity FLOAT32_DRIFT bounds, whatever the SQNR)."""
    return 10.0 ** (-np.asarray(sqnr_db, dtype=np.float64) / 20)


def _sqnr_tolerance_holds(a, b):
    """SQNRs (dB) equal up to float32 drift: compared as relative errors, not in dB."""
    qa, qb = _relative_error(a), _relative_error(b)
    return bool(np.all(np.abs(qa - qb) <= FLOAT32_DRIFT * (1 + np.maximum(qa, qb))))


def _cosine_tolerance(cosine_min):
    """Largest move of a (mean) cosine when each angle moves by FLOAT32_DRIFT: |d cos| <= sin(theta) d + d**2 / 2."""
    c = float(np.clip(np.min(cosine_min), -1.0, 1.0))
    return FLOAT32_DRIFT * math.sqrt(1 - c * c) + FLOAT32_DRIFT ** 2 / 2


def _assert_no_near_ties(*logits):
    """Argmax-based counts are float32-robust only if no sample's two best logits are within the drift."""
    for x in logits:
        top = np.sort(np.asarray(x, dtype=np.float64), axis=1)
        assert (top[:, -1] - top[:, -2] > 2 * FLOAT32_DRIFT * np.abs(x).max()).all(), "near tie: change the seed"


def _grid_step(candidate, tensor, magnitude, table):
    """The rounding step of ``candidate``'s values up to ``magnitude``: one float16 ulp, or the int8 scale."""
    if candidate.startswith("fp16"):
        return float(np.spacing(np.float16(magnitude)))
    return table.ranges[tensor].amax / 127


# --------------------------------------------------------------------------- end to end


def test_end_to_end_matches_a_direct_onnxruntime_and_numpy_computation(setup, result):
    feeds, labels = setup["feeds"], setup["labels"]
    ref = _run_all(setup["model"].proto, feeds)["logits"].astype(np.float64)
    e2e = result.end_to_end.set_index("candidate")
    for name, written in setup["written"].items():
        cand = _run_all(written.proto, feeds)["logits"].astype(np.float64)
        row = e2e.loc[name]
        per_sample_cos = (ref * cand).sum(1) / np.sqrt((ref * ref).sum(1) * (cand * cand).sum(1))
        assert row["samples"] == N_VAL and row["output"] == "logits" and row["classes"] == 10
        # compare's sessions expose other outputs (other fusions) than these: equal up to float32 drift
        assert row["cosine"] == pytest.approx(per_sample_cos.mean(), abs=_cosine_tolerance(per_sample_cos))
        assert row["cosine_min"] == pytest.approx(per_sample_cos.min(), abs=_cosine_tolerance(per_sample_cos))
        assert _sqnr_tolerance_holds(row["sqnr_db"], _sqnr(ref, cand))
        # the worst element moves by its drift, or by one int8 / float16 step of the logits if its rounding flips
        step = _grid_step(name, "logits", np.abs(ref).max(), setup["table"])
        drift = FLOAT32_DRIFT * np.abs(ref).max()
        assert row["max_abs"] == pytest.approx(np.abs(ref - cand).max(), abs=drift + step)
        assert row["mean_abs"] == pytest.approx(np.abs(ref - cand).mean(), abs=drift)
        assert row["rel_l2"] == pytest.approx(np.linalg.norm(ref - cand) / np.linalg.norm(ref),
                                              abs=FLOAT32_DRIFT * (1 + row["rel_l2"]))
        _assert_no_near_ties(ref, cand)
        agree = ref.argmax(1) == cand.argmax(1)
        assert row["top1_agreement"] == pytest.approx(100 * agree.mean())
        rc, cc = ref.argmax(1) == labels, cand.argmax(1) == labels
        assert row["ref_top1"] == pytest.approx(100 * rc.mean()) and row["top1"] == pytest.approx(100 * cc.mean())
        assert row["top1_drop"] == pytest.approx(100 * (rc.mean() - cc.mean()))
        r5 = (np.argsort(-ref, 1, kind="stable")[:, :5] == labels[:, None]).any(1)
        c5 = (np.argsort(-cand, 1, kind="stable")[:, :5] == labels[:, None]).any(1)
        assert row["top5_drop"] == pytest.approx(100 * (r5.mean() - c5.mean()))
        b, c = int((rc & ~cc).sum()), int((~rc & cc).sum())
        assert (row["ref_only_correct"], row["cand_only_correct"]) == (b, c)
        assert row["mcnemar_p"] == pytest.approx(_mcnemar(b, c))
        for k in ("top1_agreement", "top1", "ref_top1", "top1_drop", "cosine"):
            assert row[f"{k}_ci_low"] <= row[k] + 1e-9 <= row[f"{k}_ci_high"] + 2e-9, k
        assert row["nan_count"] == 0
    ps = result.per_sample
    assert len(ps) == 3 * N_VAL and set(ps["candidate"]) == set(setup["written"])
    one = ps[ps["candidate"] == "int8"]
    assert one["sample"].tolist() == list(range(N_VAL)) and one["key"].iloc[0] == "val[0]"
    assert one["label"].tolist() == labels.tolist()


def test_fp16_is_closer_than_int8_and_thresholds_check_per_candidate(result):
    e2e = result.end_to_end.set_index("candidate")
    assert e2e.loc["fp16", "sqnr_db"] > e2e.loc["int8", "sqnr_db"] + 15
    checks = result.check("sqnr_db>=50")
    assert checks["fp16"].passed and not checks["int8"].passed and not checks["int8-ort"].passed
    assert result.check("top1_drop_ci_high<=100")["int8"].passed
    with pytest.raises(ThresholdError, match="iou"):
        result.check("iou>0.5")



def test_a_native_fp16_candidate_on_onnxruntime_is_flagged_as_not_measuring_fp16(setup, result):
    """ORT's CPU provider computes a native float16 model's activations in float32: its figures are better than
    float16's. The comparison says so (and how to measure float16), for a written model and for a bare .onnx;
    the simulated write, which rounds every activation, measures lower and is not flagged."""
    assert not [w for w in result.warnings if "float16" in w]  # the fixture's fp16 is the simulated write
    native = write_model(setup["model"], uniform_plan("fp16"), None, WriteOptions())
    bare = model_from_proto(native.proto, label="bare")
    res = compare(setup["model"], {"native": native, "bare": bare, "simulated": setup["written"]["fp16"]},
                  setup["val"], CompareOptions(batch_size=16, bootstrap=0, per_layer=False))
    flagged = [w for w in res.warnings if "do not measure FP16 accuracy" in w]
    assert [w.split("'")[1] for w in flagged] == ["native", "bare"] and "--fp16-simulation" in flagged[0]
    e2e = res.end_to_end.set_index("candidate")
    assert e2e.loc["native", "sqnr_db"] > e2e.loc["simulated", "sqnr_db"] + 1
    assert e2e.loc["simulated", "sqnr_db"] == result.end_to_end.set_index("candidate").loc["fp16", "sqnr_db"]



def test_agreement_intervals_are_exact_and_do_not_collapse_when_every_sample_agrees(setup):
    """The bootstrap gave "100 [100, 100]" and a top-1 drop of "0 [0, 0]" when every sample agrees, so a
    top1_drop_ci_high<=1 gate passed on a dozen samples. Agreement and accuracy get the exact (Clopper-Pearson)
    interval; a drop with few discordant samples the exact bounds of its two kinds of disagreement."""
    from quantlab.data import from_arrays as arrays

    n = 12
    feeds = {k: v[:n] for k, v in setup["feeds"].items()}
    fp32 = {"same": setup["model"]}  # the reference itself: every sample agrees
    val = arrays(feeds, labels=setup["labels"][:n], role="validation", name="val12")
    res = compare(setup["model"], fp32, val, CompareOptions(batch_size=4, bootstrap=200, per_layer=False))
    row = res.end_to_end.iloc[0]
    edge = 100 * 0.025 ** (1 / n)  # the exact 95 % lower end of 12 of 12
    assert row["top1_agreement"] == 100 and row["top1_agreement_ci_high"] == 100
    assert row["top1_agreement_ci_low"] == pytest.approx(edge, rel=1e-9)
    assert row["top1_drop"] == 0 and row["top1_drop_ci_high"] == pytest.approx(100 - edge, rel=1e-9)
    assert row["top1_drop_ci_low"] == pytest.approx(edge - 100, rel=1e-9)
    assert not res.check("top1_drop_ci_high<=1.0")["same"].passed


# --------------------------------------------------------------------------- per layer


def test_per_layer_sqnr_agrees_with_onnxruntime_qdq_loss_debug(setup, tmp_path):
    """Independent implementation: ORT's debugging tool collects activations (unoptimised sessions)."""
    from onnxruntime.quantization import qdq_loss_debug as qd

    feeds = {k: v[:32] for k, v in setup["feeds"].items()}
    written = setup["written"]["int8"]
    res = compare(setup["model"], {"int8": written}, from_arrays(feeds, role="validation"),
                  CompareOptions(batch_size=8, local=False, layers="nodes", bootstrap=0, backend_options=EXACT))
    onnx.save(setup["model"].proto, tmp_path / "f.onnx")
    onnx.save(written.proto, tmp_path / "q.onnx")
    for name in ("f", "q"):
        qd.modify_model_output_intermediate_tensors(str(tmp_path / f"{name}.onnx"), str(tmp_path / f"{name}a.onnx"))

    class Reader:
        def __init__(self):
            self.it = iter([{k: v[i:i + 8] for k, v in feeds.items()} for i in range(0, 32, 8)])

        def get_next(self):
            return next(self.it, None)

        def __iter__(self):
            return iter(self.get_next, None)

    fa = qd.collect_activations(str(tmp_path / "fa.onnx"), Reader())
    qa = qd.collect_activations(str(tmp_path / "qa.onnx"), Reader())
    rows = res.per_layer
    assert len(rows) >= 12 and set(rows["mode"]) == {"accumulated"}
    for _, row in rows.iterrows():
        carrier = written.provenance.tensor_map[row["tensor"]]
        ort_db = qd.compute_signal_to_quantization_noice_ratio(fa[row["tensor"]], qa[carrier])
        assert _sqnr_tolerance_holds(row["sqnr_db"], ort_db), (row["tensor"], row["sqnr_db"], ort_db)


def _conv(x, w, b, pad):
    """Direct 2-D convolution in float64 (stride 1): x [N,C,H,W], w [O,C,k,k]."""
    x = np.pad(x.astype(np.float64), ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    k = w.shape[-1]
    win = np.lib.stride_tricks.sliding_window_view(x, (k, k), axis=(2, 3))  # N,C,H,W,k,k
    return np.einsum("nchwij,ocij->nohw", win, w.astype(np.float64)) + b.astype(np.float64)[None, :, None, None]


def _two_conv_model():
    rng = np.random.default_rng(4)
    w1 = rng.normal(0, 0.4, (4, 3, 3, 3)).astype(np.float32)
    b1 = rng.normal(0, 0.1, (4,)).astype(np.float32)
    w2 = rng.normal(0, 0.3, (5, 4, 3, 3)).astype(np.float32)
    w2[2] *= 7.0  # channels with very different ranges: per-channel weight scales matter
    b2 = rng.normal(0, 0.1, (5,)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["out"], name="conv2", pads=[1, 1, 1, 1]),
    ]
    graph = helper.make_graph(
        nodes, "two_conv", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 5, 8, 8])],
        initializer=[numpy_helper.from_array(a, n) for n, a in [("w1", w1), ("b1", b1), ("w2", w2), ("b2", b2)]],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    return proto, w2, b2


def test_local_error_of_one_quantized_conv_equals_numpy(tmp_path):
    proto, w2, b2 = _two_conv_model()
    model = model_from_proto(proto)
    written = write_model(model, uniform_plan("int8"), _table(model, proto), WriteOptions(target="tensorrt"))
    feeds = models.random_inputs(proto, 24, seed=9)
    res = compare(model, {"int8": written}, from_arrays(feeds, role="validation"),
                  CompareOptions(batch_size=8, bootstrap=0, backend_options=EXACT))
    local = res.per_layer[(res.per_layer["mode"] == "local") & (res.per_layer["group"] == "conv2")].iloc[0]
    assert local["tensor"] == "out" and local["precision"] == "int8" and local["layer"] == "conv2"

    # independent: reference activations from the FP32 model, then Q/DQ and per-channel int8 weights in numpy
    acts = _run_all(proto, feeds, ["r1", "out"])
    s_x = np.float32(written.provenance.quantized_inputs["r1"]["scale"])
    x_q = np.clip(np.rint(acts["r1"] / s_x), -128, 127).astype(np.float32) * s_x
    s_w = (np.abs(w2).reshape(5, -1).max(1) / np.float32(127)).astype(np.float32)
    w_q = np.clip(np.rint(w2 / s_w[:, None, None, None]), -127, 127).astype(np.float32) * s_w[:, None, None, None]
    y = _conv(x_q, w_q, b2, pad=1)
    ref = acts["out"].astype(np.float64)
    assert _sqnr_tolerance_holds(local["sqnr_db"], _sqnr(ref, y))
    # float32 drift, or one input step times a weight if an input rounding flips between the two runs
    flip = float(s_x) * float(np.abs(w_q).max())
    assert local["max_abs"] == pytest.approx(np.abs(ref - y).max(), abs=FLOAT32_DRIFT * np.abs(ref).max() + flip)
    cos = (ref * y).sum() / np.sqrt((ref * ref).sum() * (y * y).sum())
    assert local["cosine"] == pytest.approx(cos, abs=_cosine_tolerance(cos))
    # accumulated error of conv2 also carries conv1's error: worse than its own
    acc = res.per_layer[(res.per_layer["mode"] == "accumulated") & (res.per_layer["group"] == "conv2")].iloc[0]
    assert acc["sqnr_db"] < local["sqnr_db"]


def test_first_group_has_equal_local_and_accumulated_error(result):
    pl = result.per_layer
    for name in ("int8", "fp16"):
        stem = pl[(pl["candidate"] == name) & (pl["group"] == "stem_conv")].set_index("mode")
        assert _sqnr_tolerance_holds(stem.loc["local", "sqnr_db"], stem.loc["accumulated", "sqnr_db"])
    assert list(pl.columns[:15]) == ["candidate", "mode", "order", "layer", "group", "op_type", "tensor", "precision",
                                     "cosine", "sqnr_db", "max_abs", "mean_abs", "rel_l2", "nan_count", "node"]
    int8 = pl[pl["candidate"] == "int8"]
    # the TensorRT form leaves Flatten in fp32 and inserts nothing for it: no local row
    assert set(int8[int8["mode"] == "local"]["group"]) == {"stem_conv", "block_conv1", "block_conv2", "dw_conv",
                                                          "pool", "fc"}
    assert (int8[int8["mode"] == "accumulated"]["order"].diff().dropna() > 0).all()
    worst = result.worst_layers(2, candidate="int8")
    assert len(worst) == 2 and worst["sqnr_db"].is_monotonic_increasing


def test_tables_do_not_depend_on_batch_size_or_layer_chunks(setup, result):
    small = compare(setup["model"], setup["written"], setup["val"],
                    CompareOptions(batch_size=5, layer_group_size=1, bootstrap=300, backend_options=EXACT))
    assert small.settings["chunks"] == 7 and small.settings["segments"]["reference"] == 7
    key = ["candidate", "mode", "tensor"]
    a = result.per_layer.set_index(key).sort_index()
    b = small.per_layer.set_index(key).sort_index()
    assert list(a.index) == list(b.index)
    # other batches and chunks mean other sessions and fusions: the same numbers up to float32 drift
    # (a 70 dB float16 tensor may move by 0.02 dB: compare relative errors and angles, not dB)
    assert _sqnr_tolerance_holds(a["sqnr_db"], b["sqnr_db"])
    angles = [np.arccos(np.clip(t["cosine"].to_numpy(), -1, 1)) for t in (a, b)]
    assert (np.abs(angles[0] - angles[1]) <= FLOAT32_DRIFT).all()
    tensors = sorted(set(a.index.get_level_values("tensor")))
    peak = {t: float(np.abs(v).max()) for t, v in _run_all(setup["model"].proto, setup["feeds"], tensors).items()}
    # the worst element moves by its drift, or by one int8 / float16 step if its rounding flips
    bound = [FLOAT32_DRIFT * peak[t] + _grid_step(c, t, peak[t], setup["table"]) for c, _, t in a.index]
    assert (np.abs(a["max_abs"] - b["max_abs"]) <= bound).all()
    e2e_a, e2e_b = (r.end_to_end.set_index("candidate").sort_index() for r in (result, small))
    assert _sqnr_tolerance_holds(e2e_a["sqnr_db"], e2e_b["sqnr_db"])
    assert (np.abs(e2e_a["cosine"] - e2e_b["cosine"]) <= _cosine_tolerance(e2e_a["cosine_min"])).all()
    models_run = [setup["model"], *setup["written"].values()]
    _assert_no_near_ties(*(_run_all(m.proto, setup["feeds"])["logits"] for m in models_run))
    cols = ["top1_agreement", "top1_drop", "mcnemar_p"]
    pd.testing.assert_frame_equal(e2e_a[cols], e2e_b[cols])


def test_same_data_and_seed_give_identical_tables(setup):
    opts = CompareOptions(batch_size=8, bootstrap=200, seed=5, workers=2, backend_options={"threads": 1})
    cands = {"int8": setup["written"]["int8"]}
    a = compare(setup["model"], cands, setup["val"], opts)
    b = compare(setup["model"], cands, setup["val"], opts)
    for name in ("end_to_end", "per_layer", "per_sample"):
        pd.testing.assert_frame_equal(getattr(a, name), getattr(b, name))
    assert a.data["sha256"] == b.data["sha256"] and a.to_dict() == b.to_dict()
    # one worker, everything in order: the same tables as two workers with the same sessions
    serial = compare(setup["model"], cands, setup["val"], dataclasses.replace(opts, workers=1))
    assert a.settings["workers"] == 2 and serial.settings["workers"] == 1
    for name in ("end_to_end", "per_layer", "per_sample"):
        pd.testing.assert_frame_equal(getattr(serial, name), getattr(a, name))
    c = compare(setup["model"], cands, setup["val"], dataclasses.replace(opts, seed=6))
    assert c.end_to_end["top1_agreement"].equals(a.end_to_end["top1_agreement"])
    assert not c.end_to_end["cosine_ci_low"].equals(a.end_to_end["cosine_ci_low"])


def test_local_only_and_end_to_end_only_modes(setup, result):
    local = compare(setup["model"], setup["written"], setup["val"],
                    CompareOptions(batch_size=8, accumulated=False, bootstrap=300, backend_options=EXACT))
    assert set(local.per_layer["mode"]) == {"local"}
    full_local = result.per_layer[result.per_layer["mode"] == "local"].reset_index(drop=True)
    assert _sqnr_tolerance_holds(local.per_layer["sqnr_db"], full_local["sqnr_db"])
    fast = compare(setup["model"], setup["written"], setup["val"],
                   CompareOptions(batch_size=8, per_layer=False, bootstrap=300, backend_options=EXACT))
    assert fast.per_layer.empty and list(fast.per_layer.columns)[:3] == ["candidate", "mode", "order"]
    assert fast.settings["segments"] == {"reference": 1, "int8": 1, "int8-ort": 1, "fp16": 1}
    assert _sqnr_tolerance_holds(fast.end_to_end["sqnr_db"], result.end_to_end["sqnr_db"])
    few = compare(setup["model"], setup["written"], setup["val"],
                  CompareOptions(batch_size=8, per_layer=False, max_samples=10, bootstrap=0))
    assert (few.end_to_end["samples"] == 10).all() and len(few.per_sample) == 30
    assert few.end_to_end["top1_ci_low"].isna().all()


def test_nodes_mode_on_a_two_input_attention_model():
    proto = models.mlp_attention()
    model = model_from_proto(proto)
    written = write_model(model, uniform_plan("int8"), _table(model, proto), WriteOptions())
    val = from_arrays(models.random_inputs(proto, 12, seed=2), role="validation")
    res = compare(model, {"int8": written}, val, CompareOptions(batch_size=4, layers="nodes", bootstrap=50))
    acc = res.per_layer[res.per_layer["mode"] == "accumulated"]
    assert {"q", "k", "v", "kt", "scores", "masked", "probs", "ctx", "o", "out"} <= set(acc["tensor"])
    assert "top1_agreement" not in res.end_to_end.columns
    loc = res.per_layer[res.per_layer["mode"] == "local"]
    assert {"q_proj", "k_proj", "v_proj", "o_proj"} <= set(loc["group"])
    assert np.isfinite(res.end_to_end["sqnr_db"]).all()


# --------------------------------------------------------------------------- bad input


def _with_nan_weight_scale(written, weight):
    proto = onnx.ModelProto()
    proto.CopyFrom(written.proto)
    dq = written.provenance.quantized_inputs[weight]["dq_node"]
    node = next(n for n in proto.graph.node if n.name == dq)
    for init in proto.graph.initializer:
        if init.name == node.input[1]:
            arr = numpy_helper.to_array(init).copy()
            arr[...] = np.nan
            init.CopyFrom(numpy_helper.from_array(arr, init.name))
    return dataclasses.replace(written, proto=proto)


def test_an_fp16_mask_beyond_float16_is_flagged_with_the_fp16_remedy():
    """An additive mask of -1e9 is -inf in float16: flagged where it first appears, with what to do about fp16
    (fp32 pin, or a mask float16 holds), and marked harmless-if-meant since Softmax keeps the outputs finite."""
    model = model_from_proto(models.dynamic_attention())
    rng = np.random.default_rng(0)
    mask = np.zeros((6, 5), np.float32)
    mask[:, 3:] = -1e9
    data = from_arrays({"x": rng.normal(size=(6, 5, 16)).astype(np.float32), "mask": mask}, role="validation")
    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))  # no table
    res = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=3, bootstrap=0))
    warning = next(w for w in res.warnings if w.startswith("candidate 'fp16': NaN/inf first appears"))
    assert "'mask4'" in warning and "65504" in warning and "fp32" in warning and "stay finite" in warning
    # with a table the mask's -1e9 is known: the nodes reading it compute in FP32, and nothing turns inf
    table = calibrate(model, data, "minmax").tables["minmax"]
    guarded = write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=True))
    res = compare(model, {"fp16": guarded}, data, CompareOptions(batch_size=3, bootstrap=0))
    assert not any("NaN/inf" in w for w in res.warnings)


def test_a_minus_inf_mask_in_both_models_is_not_flagged_and_keeps_the_figures():
    """torch exports masks as Where(pad, -inf, 0): the reference holds -inf too. Where both agree, the element
    is left out: no NaN/inf note, and the masked scores get a cosine instead of NaN."""
    proto = models.dynamic_attention()  # its mask input becomes keep (1) / pad (0), made -inf in the graph
    proto.graph.node.insert(0, helper.make_node("Equal", ["mask", "zero"], ["is_pad"], name="is_pad"))
    proto.graph.node.insert(1, helper.make_node("Where", ["is_pad", "minus_inf", "zero"], ["additive"], name="where"))
    next(n for n in proto.graph.node if n.name == "mask_unsqueeze").input[0] = "additive"
    proto.graph.initializer.extend([numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
                                    numpy_helper.from_array(np.array(-np.inf, np.float32), "minus_inf")])
    model = model_from_proto(proto)
    rng = np.random.default_rng(0)
    mask = np.ones((6, 5), np.float32)
    mask[:, 3:] = 0.0
    data = from_arrays({"x": rng.normal(size=(6, 5, 16)).astype(np.float32), "mask": mask}, role="validation")
    table = calibrate(model, data, "minmax").tables["minmax"]
    fp16 = write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=True))
    res = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=3, bootstrap=0))
    assert not [w for w in res.warnings if "NaN/inf" in w], res.warnings
    pl = res.per_layer.set_index(["mode", "tensor"])
    row = pl.loc[("accumulated", "masked")]
    assert row["nan_count"] == 0 and 0.999 < row["cosine"] <= 1.0
    assert res.end_to_end["nan_count"].sum() == 0


@pytest.mark.parametrize("simulation", [False, True], ids=["float16", "simulated"])
def test_an_hf_mask_at_float32_min_gives_no_false_nan_in_local_mode(simulation):
    """(1 - keep) * finfo(float32).min is -65504 in the FP16 candidate (its constants are clipped), but local mode
    fed islands the reference's -3.4e38, which became -inf in float16: every T5/wav2vec2 FP16 run was told NaN
    'first appears' at the mask's Add and to pin it to fp32, which did not help. Islands of FP16 groups are fed
    values saturated at +-65504, as the candidate holds them."""
    model = model_from_proto(models.hf_mask_softmax())
    rng = np.random.default_rng(0)
    keep = (rng.random((8, 4)) < 0.7).astype(np.float32)
    keep[:, 0] = 1.0
    data = from_arrays({"scores": rng.normal(size=(8, 4)).astype(np.float32), "keep": keep}, role="validation")
    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=simulation))
    res = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=4, bootstrap=0))
    assert not [w for w in res.warnings if "NaN/inf" in w], res.warnings
    local = res.per_layer[res.per_layer["mode"] == "local"].set_index("tensor")
    assert local.loc["masked", "nan_count"] == 0 and local.loc["probs", "nan_count"] == 0
    assert res.end_to_end["nan_count"].sum() == 0 and res.end_to_end["cosine"].min() > 0.999


def test_nan_in_a_candidate_is_flagged_at_the_first_layer(setup):
    # NaN weights in block_conv2: its output is NaN; the next group's Q turns NaN into numbers again
    swallowed = _with_nan_weight_scale(setup["written"]["int8"], "w2")
    # NaN weights in the last layer: NaN reaches the outputs
    visible = _with_nan_weight_scale(setup["written"]["int8"], "wf")
    res = compare(setup["model"], {"swallowed": swallowed, "visible": visible}, setup["val"],
                  CompareOptions(batch_size=16, bootstrap=0))
    e2e = res.end_to_end.set_index("candidate")
    assert e2e.loc["swallowed", "nan_count"] == 0 and np.isfinite(e2e.loc["swallowed", "cosine"])
    assert e2e.loc["visible", "nan_count"] == N_VAL * 10 and math.isnan(e2e.loc["visible", "cosine"])
    pl = res.per_layer
    acc = pl[(pl["mode"] == "accumulated") & (pl["candidate"] == "swallowed")]
    first = acc[acc["nan_count"] > 0].iloc[0]
    assert first["group"] == "block_conv2" and first["nan_count"] == N_VAL * 8 * 16 * 16
    assert (acc[acc["order"] < first["order"]]["nan_count"] == 0).all()
    assert any(w.startswith("candidate 'swallowed': NaN/inf first appears") and "'block_conv2'" in w
               for w in res.warnings)
    assert any(w.startswith("candidate 'visible': NaN/inf first appears") and "layer 'fc'" in w
               and "outputs hold 480" in w for w in res.warnings)
    loc = pl[(pl["mode"] == "local") & (pl["candidate"] == "swallowed")].set_index("group")
    assert loc.loc["block_conv2", "nan_count"] > 0 and loc.loc["dw_conv", "nan_count"] == 0
    assert not res.check("cosine>=0.5")["visible"].passed


def test_candidate_with_other_inputs_or_outputs_is_refused(setup):
    proto = onnx.ModelProto()
    proto.CopyFrom(setup["model"].proto)
    proto.graph.output[0].name = "scores"
    proto.graph.node[-1].output[0] = "scores"
    with pytest.raises(CompareError, match=r"outputs \['scores'\].*\['logits'\].*missing \['logits'\]"):
        compare(setup["model"], {"renamed": model_from_proto(proto)}, setup["val"])
    proto = onnx.ModelProto()
    proto.CopyFrom(setup["model"].proto)
    proto.graph.input[0].name = "image"
    proto.graph.node[0].input[0] = "image"
    with pytest.raises(CompareError, match="candidate 'other' has inputs \\['image'\\]"):
        compare(setup["model"], {"other": model_from_proto(proto)}, setup["val"])


def test_candidate_written_from_another_model_is_refused(setup):
    other = models.conv_net()  # same inputs and outputs as residual_net, other layers
    m = model_from_proto(other)
    written = write_model(m, uniform_plan("int8"), _table(m, other), WriteOptions())
    with pytest.raises(CompareError, match="written from another model"):
        compare(setup["model"], {"x": written}, setup["val"])


def test_labels_that_do_not_fit_the_outputs_name_the_sample(setup):
    labels = setup["labels"].copy()
    labels[13] = 10
    val = from_arrays(setup["feeds"], labels=labels, role="validation", name="bad")
    with pytest.raises(CompareError, match=r"sample 13 \('bad\[13\]'\) has label 10.*'logits' with 10 classes"):
        compare(setup["model"], {"int8": setup["written"]["int8"]}, val, CompareOptions(per_layer=False))
    unlabelled = from_arrays(setup["feeds"], role="validation")
    with pytest.raises(CompareError, match="labels were asked for"):
        compare(setup["model"], {"int8": setup["written"]["int8"]}, unlabelled, CompareOptions(labels=True))
    ignored = compare(setup["model"], {"int8": setup["written"]["int8"]}, val,
                      CompareOptions(per_layer=False, labels=False, bootstrap=0))
    assert "top1_drop" not in ignored.end_to_end.columns and "top1_agreement" in ignored.end_to_end.columns


def test_user_metric_adds_columns_and_a_failing_metric_names_the_sample(setup, tmp_path):
    (tmp_path / "my_metric.py").write_text(
        "import numpy as np\n"
        "def agree(ref, cand, label):\n"
        "    return {'argmax_same': float(ref['logits'].argmax() == cand['logits'].argmax()),\n"
        "            'label_seen': float(label is not None)}\n"
        "def boom(ref, cand, label):\n"
        "    if label == LABEL:\n"
        "        raise ValueError('cannot score this one')\n"
        "    return {'x': 1.0}\n".replace("LABEL", str(int(setup["labels"][4]))))
    spec = f"{tmp_path / 'my_metric.py'}:agree"
    res = compare(setup["model"], {"int8": setup["written"]["int8"]}, setup["val"],
                  CompareOptions(per_layer=False, metric=spec, bootstrap=100))
    row = res.end_to_end.iloc[0]
    assert row["argmax_same"] == pytest.approx(row["top1_agreement"] / 100) and row["label_seen"] == 1.0
    assert "argmax_same_ci_low" in res.end_to_end.columns and "argmax_same" in res.per_sample.columns
    assert res.check("argmax_same>=0.5")["int8"].passed
    first = int(np.flatnonzero(setup["labels"] == setup["labels"][4])[0])
    with pytest.raises(CompareError, match=rf"raised ValueError: cannot score this one on sample {first} "):
        compare(setup["model"], {"int8": setup["written"]["int8"]}, setup["val"],
                CompareOptions(per_layer=False, metric=f"{tmp_path / 'my_metric.py'}:boom"))
    with pytest.raises(CompareError, match="no function 'nope'"):
        compare(setup["model"], {"int8": setup["written"]["int8"]}, setup["val"],
                CompareOptions(per_layer=False, metric=f"{tmp_path / 'my_metric.py'}:nope"))


def test_validation_sizes_and_values_calibration_did_not_cover_are_warned():
    """An any-size classifier calibrated on 16 px images and compared on 24 px ones: the comparison names the
    sizes (and, on brighter images, the values) its ranges never saw; images like the calibration's: no word."""
    model = model_from_proto(models.any_size_classifier(), label="any_size")
    rng = np.random.default_rng(0)
    images = {s: rng.uniform(-1, 1, (6, 3, s, s)).astype(np.float32) for s in (16, 24)}
    cal = summarize(from_arrays({"image": images[16][:3]}))
    table = calibrate(model, from_arrays({"image": images[16][:3]}), "minmax").tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    options = CompareOptions(per_layer=False, bootstrap=0, batch_size=3)

    def warned(images: np.ndarray) -> list[str]:
        result = compare(model, {"int8": int8}, from_arrays({"image": images}, role="validation"), options,
                         calibration=cal)
        return [w for w in result.warnings if w.startswith("input 'image': validation")]

    assert warned(images[16][3:]) == []
    (sized,) = warned(images[24])
    assert "sizes [3, 24, 24] where calibration covered [3, 16, 16]" in sized
    assert len(warned(images[16][3:] * 2.0)) == 1


def test_overlap_with_the_calibration_set_and_role_are_warned(setup):
    cal = summarize(from_arrays({k: v[:20] for k, v in setup["feeds"].items()}))
    res = compare(setup["model"], {"int8": setup["written"]["int8"]}, setup["val"],
                  CompareOptions(per_layer=False, bootstrap=0), calibration=cal)
    assert any("shares 20 sample(s)" in w for w in res.warnings)
    calib_role = from_arrays(setup["feeds"], labels=setup["labels"])
    res = compare(setup["model"], {"int8": setup["written"]["int8"]}, calib_role,
                  CompareOptions(per_layer=False, bootstrap=0))
    assert any('role = "calibration"' in w for w in res.warnings)


def test_plain_onnx_candidate_is_compared_end_to_end_only(setup):
    plain = model_from_proto(setup["written"]["int8"].proto)
    res = compare(setup["model"], {"plain": plain, "int8": setup["written"]["int8"]}, setup["val"],
                  CompareOptions(bootstrap=0))
    assert set(res.per_layer["candidate"]) == {"int8"}
    assert any("'plain' has no provenance" in w for w in res.warnings)
    e2e = res.end_to_end.set_index("candidate")
    assert _sqnr_tolerance_holds(e2e.loc["plain", "sqnr_db"], e2e.loc["int8", "sqnr_db"])
    assert res.models["candidates"]["plain"]["kind"] == "onnx"


def test_bad_options_are_refused():
    with pytest.raises(CompareError, match="batch_size"):
        CompareOptions(batch_size=0)
    with pytest.raises(CompareError, match="layers"):
        CompareOptions(layers="all")  # type: ignore[arg-type]
    with pytest.raises(CompareError, match="module:function"):
        CompareOptions(metric="no_colon")


# --------------------------------------------------------------------------- saving, loading, CLI


def test_save_and_load_round_trip(result, tmp_path):
    out = tmp_path / "cmp"
    paths = result.save(out)
    assert {p.name for p in out.iterdir()} == {"compare.json", "end_to_end.parquet", "end_to_end.csv",
                                               "per_layer.parquet", "per_layer.csv", "per_sample.parquet",
                                               "per_sample.csv"}
    assert paths["json"] == out / "compare.json"
    back = load_comparison(out)
    for name in ("end_to_end", "per_layer", "per_sample"):
        pd.testing.assert_frame_equal(getattr(back, name), getattr(result, name))
    record = json.loads((out / "compare.json").read_text())
    assert record["format"] == "quantlab.compare/1"
    assert record["data"]["sha256"] == result.data["sha256"] and record["data"]["count"] == N_VAL
    assert record["settings"]["bootstrap"] == 300 and "onnxruntime" in record["environment"]["versions"]
    assert record["models"]["candidates"]["int8"]["plan_hash"] == result.models["candidates"]["int8"]["plan_hash"]
    assert back.warnings == result.warnings and back.check("cosine>=0.9") == result.check("cosine>=0.9")
    result.save(out)  # a previous comparison may be replaced
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    with pytest.raises(CompareError, match="not a comparison folder"):
        result.save(foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    with pytest.raises(CompareError, match="cannot read"):
        load_comparison(foreign)


def test_load_candidate_from_build_folders_and_files(setup, tmp_path):
    save_written(setup["written"]["int8"], tmp_path / "int8")
    cand = load_candidate(tmp_path / "int8", setup["model"])
    assert cand.provenance.tensor_map == setup["written"]["int8"].provenance.tensor_map
    assert load_candidate(tmp_path / "int8" / "model.onnx", setup["model"]).plan.plan_hash() == \
        setup["written"]["int8"].plan.plan_hash()
    onnx.save(setup["written"]["int8"].proto, tmp_path / "plain.onnx")
    assert not hasattr(load_candidate(tmp_path / "plain.onnx", setup["model"]), "provenance")
    (tmp_path / "int8" / "model.onnx").write_bytes((tmp_path / "plain.onnx").read_bytes() + b"\x00")
    with pytest.raises(Exception, match="changed after|not ONNX|truncated|cannot"):
        load_candidate(tmp_path / "int8", setup["model"])
    with pytest.raises(CompareError, match="no such file"):
        load_candidate(tmp_path / "missing", setup["model"])


def test_a_plan_that_does_not_fit_says_whether_another_quantlab_built_it(setup, tmp_path):
    """A build by an older quantlab (another quantlab-source) whose plan names nodes this one does not: say so
    and say to rebuild, not "probably built from another model"; a build from another model (its recorded
    source sha256) says that first."""
    import json

    save_written(setup["written"]["int8"], tmp_path / "int8")
    plan = json.loads((tmp_path / "int8" / "plan.json").read_text())
    plan["overrides"]["Constant_7"] = "fp32"  # a node an older loading kept
    (tmp_path / "int8" / "plan.json").write_text(json.dumps(plan))
    with pytest.raises(CompareError, match="probably built from another model"):
        load_candidate(tmp_path / "int8", setup["model"])
    prov_path = tmp_path / "int8" / "provenance.json"
    prov = json.loads(prov_path.read_text())
    prov["meta"]["versions"]["quantlab-source"] = "0123456789abcdef"
    prov_path.write_text(json.dumps(prov))
    with pytest.raises(CompareError, match=r"built by another quantlab \(source 0123456789abcdef, this one is .*"
                                           r"rebuild it with this quantlab"):
        load_candidate(tmp_path / "int8", setup["model"])
    assert prov["meta"]["source_sha256"] == setup["model"].sha256
    prov["meta"]["source_sha256"] = "f" * 64  # built from another model: that is the reason, whatever built it
    prov_path.write_text(json.dumps(prov))
    with pytest.raises(CompareError, match=r"built from another model \(sha256 ffffffffffff, the reference's is "
                                           + setup["model"].sha256[:12]):
        load_candidate(tmp_path / "int8", setup["model"])


@pytest.fixture(scope="module")
def cli_setup(setup, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    onnx.save(setup["model"].proto, root / "ref.onnx")
    save_written(setup["written"]["int8"], root / "int8")
    save_written(setup["written"]["fp16"], root / "fp16")
    np.savez(root / "val.npz", input=setup["feeds"]["input"], label=setup["labels"])
    (root / "val.toml").write_text('name = "val"\nrole = "validation"\nshuffle = false\n'
                                   '[[source]]\nkind = "npz"\npath = "val.npz"\nbatched = true\n'
                                   '[labels]\ncolumn = "label"\n')
    return root


def test_cli_writes_tables_and_gates(cli_setup, tmp_path, capsys):
    root = cli_setup
    base = [str(root / "ref.onnx"), str(root / "int8"), str(root / "fp16"), "--data", str(root / "val.toml"),
            "--bootstrap", "100", "--no-progress"]
    code = main(["compare", *base, "--out", str(tmp_path / "a"), "--fail-if", "sqnr_db<50"])
    out = capsys.readouterr().out
    assert code == 1
    assert "int8: worst layers" in out and "end to end" in out and "FAIL int8" in out and "pass fp16" in out
    assert (tmp_path / "a" / "per_layer.parquet").is_file()
    code = main(["compare", *base, "--out", str(tmp_path / "b"), "--fail-if", "top1_drop>100", "--no-local"])
    assert code == 0
    back = load_comparison(tmp_path / "b")
    assert set(back.per_layer["mode"]) == {"accumulated"} and back.data["count"] == N_VAL


def test_cli_errors_exit_2_and_write_nothing(cli_setup, tmp_path, capsys):
    root = cli_setup
    base = [str(root / "ref.onnx"), str(root / "int8"), "--data", str(root / "val.toml"), "--no-progress"]
    assert main(["compare", *base, "--out", str(tmp_path / "a"), "--fail-if", "accuracy>0.5"]) == 2
    assert "unknown metric 'accuracy'" in capsys.readouterr().err
    assert main(["compare", str(root / "ref.onnx"), str(root / "nope"), "--data", str(root / "val.toml"),
                 "--out", str(tmp_path / "b")]) == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_nan_candidate_fails_the_gate(setup, cli_setup, tmp_path, capsys):
    broken = _with_nan_weight_scale(setup["written"]["int8"], "wf")
    onnx.save(broken.proto, tmp_path / "broken.onnx")
    code = main(["compare", str(cli_setup / "ref.onnx"), str(tmp_path / "broken.onnx"), "--data",
                 str(cli_setup / "val.toml"), "--out", str(tmp_path / "o"), "--fail-if", "cosine<0.9",
                 "--no-progress", "--bootstrap", "0"])
    out = capsys.readouterr().out
    assert code == 1 and "cannot be evaluated" in out and "end-to-end comparison only" in out
    assert re.search(r"cannot be evaluated \(cosine<0\.9 is NaN: the candidate's outputs hold \d+ NaN/inf value", out)


def test_boxes_nms_keeps_may_differ_in_number_and_are_compared_where_they_agree():
    """A detector with NMS in its graph: a candidate keeps a box more or fewer than FP32 on some images (INT8
    does, near the score threshold; here a candidate with a higher threshold, so the count of such images does
    not hang on a CPU's kernels). That output cannot be compared element by element there: those samples are
    counted, named in a warning and left out of its figures; the other outputs are complete (before:
    CompareError)."""
    model = model_from_proto(models.nms_detector(score_threshold=0.57))
    stricter = model_from_proto(models.nms_detector(score_threshold=0.62))
    x = np.random.default_rng(0).normal(size=(10, 3, 16, 16)).astype(np.float32)
    result = compare(model, {"stricter": stricter}, from_arrays({"image": x}, role="validation"),
                     CompareOptions(batch_size=1))
    fp32, other = (ort.InferenceSession(serialize(p), providers=["CPUExecutionProvider"])
                   for p in (model.proto, stricter.proto))
    counts = [(len(fp32.run(["kept_boxes"], {"image": x[i:i + 1]})[0]),
               len(other.run(["kept_boxes"], {"image": x[i:i + 1]})[0])) for i in range(10)]
    differ = sum(a != b for a, b in counts)
    assert 0 < differ < 10, counts  # the checks below can fail both ways
    assert any(f"another shape than the reference's on {differ} of 10 sample(s)" in w for w in result.warnings)
    rows = result.end_to_end.set_index("output")
    assert np.isfinite(rows.loc["kept_boxes", "cosine"]) and rows.loc["scores", "cosine"] == 1.0
    assert "top1_agreement" not in rows.columns or math.isnan(rows.loc["kept_boxes", "top1_agreement"])
    none = compare(model, {"none": model_from_proto(models.nms_detector(score_threshold=0.9))},
                   from_arrays({"image": x}, role="validation"), CompareOptions(batch_size=1, bootstrap=0,
                                                                                per_layer=False))
    (note,) = [w for w in none.warnings if "another shape" in w]  # every image keeps fewer boxes: nothing is left
    assert "on 10 of 10 sample(s); it has no figures (NaN)" in note
    assert math.isnan(none.end_to_end.set_index("output").loc["kept_boxes", "cosine"])
    from quantlab.cli.compare import known_metrics
    from quantlab.compare.labels import classifier_outputs

    assert classifier_outputs(model) == {}  # [K, 4] boxes are not 4 classes: no top-1 threshold to set on them
    assert "top1_agreement" not in known_metrics(model, False)
    same = [i for i, (a, b) in enumerate(counts) if a == b]
    per_sample = result.per_sample[result.per_sample["output"] == "kept_boxes"]
    assert per_sample["cosine"].isna().sum() == differ and (per_sample["cosine"].iloc[same] == 1.0).all()


def test_a_0d_float_tensor_feeds_an_fp16_island_in_local_mode():
    """A scalar computed from a shape (1/sqrt(d) of an attention) fed to an FP16 group's island: np.clip gave a
    numpy scalar, which ONNX Runtime refused ('Unable to handle object of type numpy.float32'): every FP16
    comparison of a GPT-style decoder failed."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Shape", ["x"], ["shape"], name="shape"),
             helper.make_node("Gather", ["shape", "last"], ["width"], name="width", axis=0),
             helper.make_node("Cast", ["width"], ["widthf"], name="widthf", to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["widthf"], ["root"], name="root"),
             helper.make_node("MatMul", ["x", "w"], ["h"], name="proj"),
             helper.make_node("Div", ["h", "root"], ["y"], name="scale")]
    graph = helper.make_graph(nodes, "scaled", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 6])],
                              [numpy_helper.from_array(np.array(1, np.int64), "last"),
                               numpy_helper.from_array(rng.normal(size=(8, 6)).astype(np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x": rng.normal(size=(6, 8)).astype(np.float32)}, role="validation")
    for simulation in (False, True):
        fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=simulation))
        res = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=3, bootstrap=0))
        local = res.per_layer[res.per_layer["mode"] == "local"]
        assert "y" in set(local["tensor"]) and res.end_to_end["sqnr_db"].iloc[0] > 50


def test_candidates_written_for_tensorrt_run_their_qdq_as_written_on_onnxruntime(setup):
    """TensorRT computes the Q/DQ's ONNX semantics; ORT's fused integer kernels round differently, and differently
    on a CPU with VNNI: with only TensorRT-form INT8 candidates the comparison runs them as written (as the search
    measures), so its figures do not depend on the CPU; an ORT-form candidate keeps ORT's own choice."""
    options = CompareOptions(batch_size=16, bootstrap=0, per_layer=False)
    written = setup["written"]
    trt = compare(setup["model"], {"int8": written["int8"], "fp16": written["fp16"]}, setup["val"], options)
    assert trt.environment["backend"]["details"]["qdq_fusion"] is False
    exact = compare(setup["model"], {"int8": written["int8"]}, setup["val"], dataclasses.replace(options, backend_options=EXACT))
    rows = [frame[frame["candidate"] == "int8"].reset_index(drop=True) for frame in (trt.end_to_end, exact.end_to_end)]
    pd.testing.assert_frame_equal(*rows)
    mixed = compare(setup["model"], {"int8": written["int8"], "int8-ort": written["int8-ort"]}, setup["val"],
                    options)
    forced = environment_options()[0]  # QUANTLAB_ORT_QDQ_FUSION, which the CI's other kernel runs set
    ort_choice = "auto" if forced is None else forced
    assert mixed.environment["backend"]["details"]["qdq_fusion"] == ort_choice
    # beside an ORT-form candidate the TensorRT-form one still runs as written: the same figures as alone
    assert mixed.environment["candidate_backends"]["int8"]["details"]["qdq_fusion"] is False
    rows = [frame[frame["candidate"] == "int8"].reset_index(drop=True) for frame in (mixed.end_to_end,
                                                                                    exact.end_to_end)]
    pd.testing.assert_frame_equal(*rows)
    bare = compare(setup["model"], {"bare": model_from_proto(written["int8"].proto, label="bare")}, setup["val"],
                   options)  # no provenance: its int8 zero points and float bias say TensorRT form
    assert bare.environment["backend"]["details"]["qdq_fusion"] is False
    bare_ort = compare(setup["model"], {"bare": model_from_proto(written["int8-ort"].proto, label="bare")},
                       setup["val"], options)  # uint8 activations, int32 bias: ORT's own choice
    assert bare_ort.environment["backend"]["details"]["qdq_fusion"] == ort_choice


def test_a_while_loop_may_stop_at_another_step_and_is_compared_where_it_agrees():
    """A Loop that runs until its state converges: a candidate may take one step more or fewer (INT8 near the
    tolerance; here a candidate with a looser tolerance, so the count does not hang on a CPU's kernels). Its
    scanned outputs then have another length: counted, named in a warning, and for the integer ids counted as
    no exact match (before: CompareError "the written model does not compute the same layer")."""
    from quantlab.graph.samples import data_sized

    model = model_from_proto(models.until_converged(tol=0.05))
    looser = model_from_proto(models.until_converged(tol=0.08))
    # the scans take the steps' count; the final state keeps its shape ([N, 16] into and out of the body)
    assert {"steps", "ids"} <= data_sized(model) and "refined" not in data_sized(model)
    assert not data_sized(model_from_proto(models.refinement_loop()))  # a for loop: its length is its trip count
    x = np.random.default_rng(0).normal(size=(24, 16)).astype(np.float32)
    result = compare(model, {"looser": looser}, from_arrays({"input": x}, role="validation"),
                     CompareOptions(batch_size=1, bootstrap=100))
    fp32, other = (ort.InferenceSession(serialize(p), providers=["CPUExecutionProvider"])
                   for p in (model.proto, looser.proto))
    ids = [(fp32.run(["ids"], {"input": x[i:i + 1]})[0], other.run(["ids"], {"input": x[i:i + 1]})[0])
           for i in range(24)]
    differ = sum(a.shape != b.shape for a, b in ids)
    assert 0 < differ < 24, [a.shape[0] for a, _ in ids]  # the checks below can fail both ways
    assert any("output 'steps' (its size decided by the data" in w and f"on {differ} of 24 sample(s)" in w
               for w in result.warnings)
    row = result.end_to_end.set_index("output").loc["ids"]
    exact = sum(a.shape == b.shape and (a == b).all() for a, b in ids)
    assert row["exact_match"] == pytest.approx(100.0 * exact / 24)
    assert row["exact_match_ci_low"] < row["exact_match"] < row["exact_match_ci_high"]
    assert np.isfinite(result.end_to_end.set_index("output").loc["steps", "cosine"])


def test_a_sequence_output_is_left_out_with_a_warning():
    """An output of sequence type (SequenceConstruct; ZipMap gives maps): ONNX Runtime returns a list, which was
    stacked into one array and refused as "[2, 8, 8] for a batch of 8 samples"; it is now named and left out."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("Relu", ["y"], ["r"], name="relu"),
             helper.make_node("SequenceConstruct", ["y", "r"], ["seq"], name="seq")]
    graph = helper.make_graph(
        nodes, "sequence_output", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
        [helper.make_tensor_value_info("r", TensorProto.FLOAT, ["N", 8]),
         helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.random.default_rng(0).normal(0, 0.5, (8, 8)).astype(np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x": np.random.default_rng(1).normal(0, 1, (16, 8)).astype(np.float32)}, role="validation")
    table = calibrate(model, data, "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    result = compare(model, {"int8": written}, data, CompareOptions(bootstrap=0))
    assert result.end_to_end["output"].tolist() == ["r"] and result.end_to_end["cosine"].iloc[0] > 0.99
    assert any("output 'seq' is a sequence or map" in w for w in result.warnings)


def test_layers_of_dynamic_size_are_sized_by_the_first_batch():
    """A text detector's H and W are dynamic: its layers had no size, counted 0 against the memory budget, and one
    chunk held 48 tensors of 8 images at 640x480 (12 GB). The first batch sizes them; chunks then split."""
    from quantlab.backends import get_backend
    from quantlab.compare.layers import analyse_reference, chunks, layers_per_group, sized_by_first_batch

    model = model_from_proto(models.text_recognizer())
    per_group = layers_per_group(analyse_reference(model), "groups")
    assert any(x.elements is None for g in per_group for x in g)
    data = from_arrays({"image": np.zeros((4, 3, 48, 64), np.float32)})
    sized = sized_by_first_batch(per_group, model, data, 2)
    layers = {x.tensor: x for g in sized for x in g}
    runner = get_backend("ort").build(model.proto, outputs=list(layers))
    got = runner.run({"image": np.zeros((2, 3, 48, 64), np.float32)}, list(layers))
    assert all(layers[t].elements == v[0].size for t, v in got.items() if t in ("r1", "r2", "pooled"))
    assert all(layers[t].elements >= v[0].size for t, v in got.items())  # past a Reshape: the layer before's
    options = CompareOptions(batch_size=2, memory_budget_mb=sum(x.elements for x in layers.values()) * 8 / 2**20 / 3)
    assert len(chunks(per_group, options)) == 1 < len(chunks(sized, options))


def test_samples_whose_reference_is_near_zero_are_named_in_a_warning():
    """PP-OCRv4's detector maps an image without text to ~1e-7 everywhere: those samples' cosine (0.3-0.7) is
    noise, and the mean cosine read 0.905 where SQNR read 12 dB. The warning says how many and what to read."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])], [w])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.normal(size=(6, 8)).astype(np.float32)
    x[[1, 4]] *= 1e-5  # two "empty images"
    data = from_arrays({"x": x}, role="validation")
    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    result = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=3, per_layer=False, bootstrap=0))
    (warning,) = [w for w in result.warnings if "close to zero" in w]
    assert warning.startswith("output 'y': 2 of 6 sample(s)") and "sqnr_db" in warning
    plain = from_arrays({"x": rng.normal(size=(6, 8)).astype(np.float32)}, role="validation")
    again = compare(model, {"fp16": fp16}, plain, CompareOptions(batch_size=3, per_layer=False, bootstrap=0))
    assert not any("close to zero" in w for w in again.warnings)


def test_an_output_with_one_value_per_sample_gets_no_near_zero_cosine_warning():
    """hey_jarvis's score ``[N, 1]``: compare said its cosine is left out, then that 10 samples near zero pull the
    mean cosine down: two notes that contradict each other. Only the first is said."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.5, (8, 1)).astype(np.float32), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["score"], name="mm")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N", 1])], [w])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    x = rng.normal(size=(6, 8)).astype(np.float32)
    x[[1, 4]] *= 1e-5
    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    result = compare(model, {"fp16": fp16}, from_arrays({"x": x}, role="validation"),
                     CompareOptions(batch_size=3, per_layer=False, bootstrap=0))
    assert sum("'score' holds one value per sample" in w for w in result.warnings) == 1
    assert not any("close to zero" in w for w in result.warnings)


def test_an_output_returned_with_another_rank_than_declared_is_a_warning():
    """ddddocr's recogniser declares its output [1, seqlen] and returns [T, 1, C] CTC scores: token agreement,
    which reads the declaration, was left out without a word."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"], name="dense"),
         helper.make_node("Unsqueeze", ["z", "zero"], ["scores"], name="time_axis")], "misdeclared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["N", 5])],  # really [1, N, 5]
        [numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "w"),
         numpy_helper.from_array(np.array([0], np.int64), "zero")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x": rng.normal(size=(4, 4)).astype(np.float32)}, role="validation")
    res = compare(model, {"same": model}, data, CompareOptions(batch_size=1, bootstrap=0, per_layer=False))
    warning = next(w for w in res.warnings if "is declared" in w)
    assert "'scores' is declared [N, 5] but the model returns shape [1, 1, 5]" in warning


def test_ctc_scores_declared_with_another_rank_are_read_as_returned():
    """ddddocr's recogniser: batch fixed at 1, ``[T, 1, C]`` CTC scores declared ``[1, T]``. ``--ctc-blank 0`` was
    refused ("no output holds class scores per position") and token agreement missing; the first batch now shows
    what the model returns, the output is read so (with a note), and a candidate written from the same export,
    declaring what it did, is compared."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["z"], name="dense"),
         helper.make_node("Transpose", ["z"], ["scores"], name="time_major", perm=[1, 0, 2])], "ctc_misdeclared",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 4])],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, "T"])],  # really [T, 1, 5]
        [numpy_helper.from_array(rng.normal(size=(4, 5)).astype(np.float32), "w")])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model = model_from_proto(proto)
    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    data = from_arrays({"x": rng.normal(size=(6, 7, 4)).astype(np.float32)}, role="validation")
    res = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=1, bootstrap=0, per_layer=False,
                                                              ctc_blank=0))
    note = next(w for w in res.warnings if "is declared" in w)
    assert "returns shape [7, 1, 5]: read as returned ([scores_dim0, 1, 5])" in note
    row = res.end_to_end.iloc[0]
    assert row["token_agreement"] > 90 and "text_agreement" in res.end_to_end.columns


def test_a_recurrent_state_is_not_taken_for_a_detectors_rows_of_scales():
    """Silero VAD v6 returns ``hn [1, 1, 128]`` beside its input ``h [1, 1, 128]``: a near-dead hidden unit made
    the spread check warn of "a detector's box coordinates beside its scores" on every compare. An output of an
    input's very shape is a state; a ``[N, 6, A]`` output of rows 100x apart still gets the warning."""
    rng = np.random.default_rng(0)
    gain = numpy_helper.from_array(np.r_[np.full(7, 1.0), 1e-4].astype(np.float32).reshape(1, 1, 8), "gain")
    rows = numpy_helper.from_array(np.repeat(np.r_[np.full(4, 300.0), np.full(2, 0.5)].reshape(1, 6, 1), 5, axis=2)
                                   .astype(np.float32), "rows")
    graph = helper.make_graph(
        [helper.make_node("Add", ["h", "x3"], ["mixed"], name="mix"),
         helper.make_node("Tanh", ["mixed"], ["t"], name="tanh"),
         helper.make_node("Mul", ["t", "gain"], ["hn"], name="units"),
         helper.make_node("Mul", ["x6", "rows"], ["boxes"], name="scale_rows")], "stateful",
        [helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 1, 8]),
         helper.make_tensor_value_info("x3", TensorProto.FLOAT, [1, 1, 8]),
         helper.make_tensor_value_info("x6", TensorProto.FLOAT, [1, 6, 1])],
        [helper.make_tensor_value_info("hn", TensorProto.FLOAT, [1, 1, 8]),
         helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 6, 5])], [gain, rows])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    feeds = {"h": rng.uniform(0.2, 1, (3, 1, 8)), "x3": rng.uniform(0.2, 1, (3, 1, 8)),
             "x6": rng.uniform(0.2, 1, (3, 6, 1))}
    data = from_arrays({k: v.astype(np.float32) for k, v in feeds.items()}, role="validation")
    res = compare(model, {"same": model}, data, CompareOptions(batch_size=1, bootstrap=0, per_layer=False))
    spread = [w for w in res.warnings if "rows of very different scales" in w]
    assert len(spread) == 1 and "'boxes'" in spread[0]


def test_an_output_that_is_mostly_a_constant_offset_is_warned_of():
    """GLPN's depth map sits at 5.0 +- 0.049: the offset alone is worth 41 dB, and an ORT-form build that kept 16 dB
    of the depths' variation read 58 dB and cosine 0.999999. Such an output is named, with what its offset is
    worth; an output centred on 0 is not."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (1, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"], name="head", pads=[1, 1, 1, 1]),
         helper.make_node("Add", ["h", "five"], ["depth"], name="offset"),
         helper.make_node("Conv", ["x", "w"], ["residual"], name="residual", pads=[1, 1, 1, 1])], "depth",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info("depth", TensorProto.FLOAT, ["N", 1, 8, 8]),
         helper.make_tensor_value_info("residual", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [w, numpy_helper.from_array(np.array(5.0, np.float32), "five")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x": rng.normal(0, 1, (6, 3, 8, 8)).astype(np.float32)}, role="validation")
    res = compare(model, {"same": model}, data, CompareOptions(batch_size=2, bootstrap=0, per_layer=False))
    (note,) = [w for w in res.warnings if "constant offset" in w]
    assert note.startswith("output 'depth' is mostly a constant offset (values 5")
    assert "is worth 29 dB" in note  # 5.02 over a spread of 0.18: 10 log10(1 + (5.02 / 0.18) ** 2)
    assert not any("'residual'" in w for w in res.warnings)  # the same map without the offset


def test_an_output_the_reference_gives_as_one_constant_is_warned_of():
    """All-zero logits (a dead head, data the model does not expect) scored SQNR inf and cosine 1 without a word:
    a candidate giving the same constant is perfect whatever its error elsewhere. Zero or not, such an output is
    named; one that varies is not."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(0, 0.05, (1, 3, 3, 3)).astype(np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["h"], name="head", pads=[1, 1, 1, 1]),
         helper.make_node("Mul", ["h", "zero"], ["zeros"], name="dead"),
         helper.make_node("Add", ["zeros", "seven"], ["sevens"], name="constant")], "dead",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 1, 8, 8]) for n in ("h", "zeros", "sevens")],
        [w, numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(7.0, np.float32), "seven")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x": rng.normal(0, 1, (6, 3, 8, 8)).astype(np.float32)}, role="validation")
    res = compare(model, {"same": model}, data, CompareOptions(batch_size=2, bootstrap=0, per_layer=False))
    notes = [w for w in res.warnings if "at every element" in w]
    assert [n.split(":")[0] for n in notes] == ["output 'zeros'", "output 'sevens'"]
    assert "gives 0 at every element" in notes[0] and "gives 7 at every element" in notes[1]
    assert not any("'sevens' is mostly a constant offset" in w for w in res.warnings)


def test_an_output_the_reference_gives_alike_for_every_sample_is_warned_of():
    """MobileViT with tiny random weights gave logits of 1e-4 that differed by 1e-10 between images: top-1
    agreement 100, no warning, and a search met sqnr_db>=38 at 103 dB by bias correction absorbing the constant. A
    classifier whose logits are its bias is named; the same classifier with working weights is not."""
    rng = np.random.default_rng(0)
    data = from_arrays({"x": rng.normal(0, 1, (6, 16)).astype(np.float32)}, role="validation")

    def classifier(scale: float):
        graph = helper.make_graph(
            [helper.make_node("Gemm", ["x", "w", "b"], ["logits"], name="fc", transB=1)], "fc",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
            [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
            [numpy_helper.from_array(rng.normal(0, scale, (10, 16)).astype(np.float32), "w"),
             numpy_helper.from_array(rng.normal(0, 1e-4, (10,)).astype(np.float32), "b")])
        return model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))

    opts = CompareOptions(batch_size=3, bootstrap=0, per_layer=False)
    dead, weak, alive = classifier(1e-12), classifier(3e-7), classifier(0.3)
    (note,) = [w for w in compare(dead, {"same": dead}, data, opts).warnings if "for every sample" in w]
    assert note.startswith("WARNING output 'logits': the reference gives the same values for every sample")
    # a dead EfficientNet head, 0.03 +- 1e-4 per class, read 32 dB where INT8's error exceeded all that varied
    (note,) = [w for w in compare(weak, {"same": weak}, data, opts).warnings if "hardly changes" in w]
    assert re.match(r"WARNING output 'logits' hardly changes with the input: only 0\.00\d+ % of its power differs "
                    r"between the samples .* worth \d\d dB of SQNR alone", note), note
    assert not any("for every sample" in w for w in compare(alive, {"same": alive}, data, opts).warnings)


@pytest.mark.parametrize("gain, warned", [(1.0, True), (0.0, False)], ids=["noisy", "noise-off"])
def test_a_reference_that_draws_random_numbers_is_warned_of(gain, warned):
    """VITS draws its latent noise in the graph: the FP32 reference gives another waveform each run, and the
    candidates' figures measured that noise as if it were quantization's. Two runs of the first batch are set side
    by side; with the noise scaled to nothing (its export with noise_scale = 0), the same graph gives no warning."""
    graph = helper.make_graph(
        [helper.make_node("RandomNormalLike", ["x"], ["noise"], name="latent_noise", scale=0.1),
         helper.make_node("Mul", ["noise", "gain"], ["scaled"], name="noise_scale"),
         helper.make_node("Add", ["x", "scaled"], ["y"], name="add_noise")], "noisy",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 16])],
        [numpy_helper.from_array(np.array(gain, np.float32), "gain")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x": np.random.default_rng(0).normal(0, 1, (4, 16)).astype(np.float32)}, role="validation")
    res = compare(model, {"same": model}, data, CompareOptions(batch_size=2, bootstrap=0, per_layer=False))
    notes = [w for w in res.warnings if "not deterministic" in w]
    assert len(notes) == int(warned)
    if warned:  # two draws of std 0.1 apart: about 17 dB
        assert "RandomNormalLike 'latent_noise'" in notes[0] and re.search(r"'y': SQNR 1\d\.\d dB", notes[0])
    # no threshold is judged on such figures (compare --fail-if, run's verdict): the reason is kept with them
    assert bool(res.unjudged()) == warned and ("y" in res.settings.get("reference_noise", {})) == warned


def test_the_per_layer_table_leaves_out_random_draws():
    """VITS's RandomNormalLike outputs headed its worst layers (each candidate's draw against the reference's):
    a draw is no layer's quantization error."""
    model = model_from_proto(models.noisy_conv_net(size=8))
    rng = np.random.default_rng(0)
    data = from_arrays({"input": rng.normal(0, 1, (4, 3, 8, 8)).astype(np.float32)}, role="validation")
    table = calibrate(model, data, "minmax").tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    res = compare(model, {"int8": int8}, data, CompareOptions(batch_size=2, bootstrap=0, layers="nodes"))
    tensors = set(res.per_layer["tensor"])
    assert "noise" not in tensors and {"conv1", "scaled", "logits"} <= tensors


def test_a_user_metric_of_yes_no_per_sample_gets_an_exact_interval():
    """A user metric of 0/100 per sample (agreement at a BERT's masked positions) read 100 [100, 100] on 192
    words, so a gate on its ``_ci_low`` could not fail; it now gets the exact binomial interval, as top-1 agreement
    does. A 0/1 column too; cosine at exactly 1 everywhere stays a bootstrap figure."""
    from quantlab.compare.intervals import exact_intervals
    from quantlab.metrics import binomial_ci

    n = 192
    got = exact_intervals({"agree_mask": np.full(n, 100.0), "hit": np.r_[np.ones(n - 2), np.zeros(2)],
                           "cosine": np.ones(n), "score": np.linspace(0, 100, n)}, 0.95)
    lo, hi = binomial_ci(n, n, 0.95)
    assert got["agree_mask"] == pytest.approx((100 * lo, 100 * hi)) and got["agree_mask"][0] < 99
    assert got["hit"] == pytest.approx(binomial_ci(n - 2, n, 0.95))
    assert "cosine" not in got and "score" not in got


def test_shares_of_positions_at_100_everywhere_get_the_exact_lower_bound_of_the_samples():
    """A decoder step's logits [N, 1, V]: token agreement 100 at each of 12 samples read 100 [100, 100] beside the
    sequence agreement's exact [73.5, 100], so ``token_agreement_ci_low<99`` passed. Each share is at most 100, so
    the samples agreeing everywhere bound the mean from below; below 100 somewhere the bootstrap's stays."""
    from quantlab.compare.intervals import exact_intervals
    from quantlab.metrics import binomial_ci

    n = 12
    got = exact_intervals({"token_agreement": np.full(n, 100.0), "miou": np.full(n, 100.0),
                           "element_match": np.r_[np.full(n - 1, 100.0), 99.0]}, 0.95)
    lo = 100 * binomial_ci(n, n, 0.95)[0]
    assert got["token_agreement"] == pytest.approx((lo, 100.0)) and got["token_agreement"][0] < 75
    assert got["miou"] == got["token_agreement"] and "element_match" not in got


def test_local_figures_of_an_fp16_group_feed_fp32_kept_nodes_their_float32_values():
    """Magika's FP16 per-layer table still showed the nodes the range guard keeps FP32 at 2-4 dB: their islands
    were fed the reference saturated at 65504 (a LayerNorm's sum of squares is 6e5), though they read float32."""
    import importlib

    beyond = importlib.import_module("test_quantize")._beyond_fp16_net()
    model = model_from_proto(beyond)
    x = np.random.default_rng(1).normal(0, 1, (16, 16)).astype(np.float32)
    data = from_arrays({"x": x}, role="validation")
    table = calibrate(model, from_arrays({"x": x}), "minmax").tables["minmax"]
    fp16 = write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=True))
    res = compare(model, {"fp16": fp16}, data, CompareOptions(batch_size=8, bootstrap=0))
    local = res.per_layer[res.per_layer["mode"] == "local"].set_index("layer")["sqnr_db"]
    assert local["scale"] > 40  # was about 0 dB: 1e5 fed in as 65504


def test_padded_positions_are_left_out_of_every_end_to_end_figure():
    """Sentences padded to one length: the outputs at padded positions are computed, read by no one, and differ
    most between FP32 and INT8 (a masked LM's token agreement and SQNR fell with the share of padding). Where
    ``attention_mask`` is 0 they are left out: the figures do not depend on what the padding holds, and token
    agreement is the real positions' (checked against the models run here with ONNX Runtime)."""
    from quantlab.calibrate import calibrate

    model = model_from_proto(models.masked_token_tagger(), label="tagger")
    rng = np.random.default_rng(0)
    n, s = 12, 6
    mask = np.ones((n, s), np.int64)
    lengths = rng.integers(2, s + 1, n)
    for i, length in enumerate(lengths):
        mask[i, length:] = 0
    x = rng.normal(size=(n, s, 16)).astype(np.float32)
    table = calibrate(model, from_arrays({"x": x, "attention_mask": np.ones_like(mask)}), "minmax",
                      batch_size=4).tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    options = CompareOptions(batch_size=4, per_layer=False, bootstrap=0)
    frames = []
    for garbage in (0.0, 40.0):
        xs = x.copy()
        xs[mask == 0] = rng.normal(0, 1, (int((mask == 0).sum()), 16)) * garbage
        result = compare(model, {"int8": int8}, from_arrays({"x": xs, "attention_mask": mask}, role="validation"),
                         options)
        frames.append(result.end_to_end.set_index("output").loc["logits"])
    padded = int((mask == 0).sum())
    assert any(f"{padded} position(s) where input 'attention_mask' is 0 (padding)" in w for w in result.warnings)
    unpadded = compare(model, {"int8": int8}, from_arrays({"x": x, "attention_mask": np.ones_like(mask)},
                                                          role="validation"), options)
    assert not any("(padding) are left out" in w for w in unpadded.warnings)  # a T5 encoder's all-ones mask
    for column in ("sqnr_db", "cosine", "max_abs", "token_agreement", "sequence_agreement"):
        assert frames[0][column] == pytest.approx(frames[1][column], rel=1e-6), column
    feeds = {"x": xs, "attention_mask": mask}
    ref = get_backend("ort").build(model.proto).run(feeds)["logits"].argmax(-1)
    cand = get_backend("ort").build(int8.proto).run(feeds)["logits"].argmax(-1)
    per_sample = [(ref[i, :k] == cand[i, :k]).mean() * 100 for i, k in enumerate(lengths)]
    assert frames[1]["token_agreement"] == pytest.approx(np.mean(per_sample), rel=1e-9)


def test_a_decoders_mask_over_its_encoders_positions_leaves_no_position_out():
    """A BART decoder step exported with both lengths fixed at 16: the encoder's ``attention_mask`` has the shape
    of the decoder's output positions, and 43 % of the real positions were left out. A mask read beside
    ``encoder_hidden_states`` (or ``decoder_input_ids``) is the encoder's: every position counts, with a note."""
    model_proto = models.masked_token_tagger()
    for node in model_proto.graph.node:
        node.input[:] = ["encoder_hidden_states" if i == "x" else i for i in node.input]
    next(i for i in model_proto.graph.input if i.name == "x").name = "encoder_hidden_states"
    model = model_from_proto(model_proto, label="decoder")
    rng = np.random.default_rng(0)
    mask = np.ones((8, 6), np.int64)
    mask[:, 3:] = 0
    x = rng.normal(size=(8, 6, 16)).astype(np.float32)
    noisy = model_from_proto(models.masked_token_tagger(seed=1))
    for node in noisy.proto.graph.node:
        node.input[:] = ["encoder_hidden_states" if i == "x" else i for i in node.input]
    next(i for i in noisy.proto.graph.input if i.name == "x").name = "encoder_hidden_states"
    result = compare(model, {"other": noisy}, from_arrays({"encoder_hidden_states": x, "attention_mask": mask},
                                                           role="validation"),
                     CompareOptions(batch_size=4, per_layer=False, bootstrap=0))
    assert not any("(padding) are left out" in w for w in result.warnings)
    (note,) = [w for w in result.warnings if "decoder's mask over its encoder's positions" in w]
    assert note.startswith("input 'attention_mask' reads as") and "'encoder_hidden_states'" in note
    ref = get_backend("ort").build(model.proto).run({"encoder_hidden_states": x, "attention_mask": mask})["logits"]
    cand = get_backend("ort").build(noisy.proto).run({"encoder_hidden_states": x, "attention_mask": mask})["logits"]
    agree = (ref.argmax(-1) == cand.argmax(-1)).mean() * 100  # every position, padded ones too
    assert result.end_to_end.set_index("output").loc["logits", "token_agreement"] == pytest.approx(agree)


def test_the_worst_layers_view_tells_the_outputs_of_one_layer_apart():
    """An LSTM writes y, hn and cn: its three rows read the same layer name in the terminal's worst-layers table
    unless the tensor is shown; a table of one row per layer stays without it."""
    import types

    from quantlab.cli.compare import _worst_view

    rows = [{"candidate": "int8", "mode": "local", "layer": layer, "tensor": tensor, "order": i, "group": layer,
             "op_type": op, "precision": "int8", "sqnr_db": 30.0 + i, "cosine": 0.99}
            for i, (layer, tensor, op) in enumerate([("/lstm/LSTM", "y", "LSTM"), ("/lstm/LSTM", "hn", "LSTM"),
                                                     ("/lstm/LSTM", "cn", "LSTM"), ("/fc/Gemm", "out", "Gemm")])]
    view = _worst_view(types.SimpleNamespace(per_layer=pd.DataFrame(rows)), "int8", 10)
    assert list(view["tensor"][:3]) == ["y", "hn", "cn"]
    single = _worst_view(types.SimpleNamespace(per_layer=pd.DataFrame(rows[2:])), "int8", 10)
    assert "tensor" not in single.columns and list(single["layer"]) == ["/lstm/LSTM", "/fc/Gemm"]


def test_a_reference_that_cannot_run_the_data_is_named_by_the_models_inputs():
    """A traced MobileViT cannot reshape 96 px: compare said it failed on a segment's inner tensors
    ('/mobilevit/encoder/layer.3/Reshape_3_output_0 [4, 4, 9, 48]'), where calibrate named pixel_values. The
    model's inputs come first now, with the segment."""
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["r"], name="relu"),
         helper.make_node("Neg", ["r"], ["n"], name="neg"),
         helper.make_node("Reshape", ["n", "rows_of_8"], ["y"], name="reshape")], "rows",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 8])],
        [numpy_helper.from_array(np.array([-1, 8], np.int64), "rows_of_8")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    from quantlab.backends import get_backend
    from quantlab.compare.segments import StagedModel

    segments = StagedModel(model.proto, [["r"], ["n"], ["y"]], get_backend("ort"), "the FP32 reference")
    live = {"x": np.ones((1, 6), np.float32)}  # 6 values a row: no rows of 8
    try:
        segments.step(0, live)
        segments.step(1, live)
        with pytest.raises(BackendError) as err:
            segments.step(2, live)
    finally:
        segments.close()
    assert str(err.value).startswith("the FP32 reference cannot run the batch whose inputs are 'x' [1, 6] (in "
                                     "segment 3 of 3): ONNX Runtime failed")


def _pooled_sqnr(ref: np.ndarray, cand: np.ndarray) -> float:
    return float(10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - cand).astype(np.float64) ** 2)))


def _as_written(proto: onnx.ModelProto, outputs: list[str], feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``outputs`` of ``proto`` computed as written: no graph optimization (exposing an intermediate tensor lets ONNX
    Runtime's optimizer move a Q/DQ across a Transpose and change what that tensor holds)."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(with_outputs(proto, outputs).SerializeToString(), so,
                                   providers=["CPUExecutionProvider"])
    return dict(zip(outputs, session.run(outputs, feeds), strict=True))


def _convnext_block(shared: bool = False) -> onnx.ModelProto:
    """Depthwise conv -> Transpose -> MatMul (ConvNeXt); ``shared``: a 1x1 conv reads the depthwise output too."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("Conv", ["x", "dw", "db"], ["dwc"], name="dwconv", group=4, pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["dwc"], ["nhwc"], name="to_nhwc", perm=[0, 2, 3, 1]),
             helper.make_node("MatMul", ["nhwc", "w"], ["y"], name="pw")]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8, 8, 6])]
    inits = [numpy_helper.from_array(rng.normal(0, 0.5, (4, 1, 3, 3)).astype(np.float32), "dw"),
             numpy_helper.from_array(rng.normal(0, 0.1, (4,)).astype(np.float32), "db"),
             numpy_helper.from_array(rng.normal(0, 0.5, (4, 6)).astype(np.float32), "w")]
    if shared:
        nodes.append(helper.make_node("Conv", ["dwc", "pw2"], ["z"], name="conv1x1"))
        outputs.append(helper.make_tensor_value_info("z", TensorProto.FLOAT, ["N", 3, 8, 8]))
        inits.append(numpy_helper.from_array(rng.normal(0, 0.5, (3, 4, 1, 1)).astype(np.float32), "pw2"))
    graph = helper.make_graph(nodes, "convnext_block",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8, 8])], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_an_int8_groups_output_qdq_that_only_float_groups_read_is_the_int8_groups_error():
    """ConvNeXt in the ORT form: the Transpose after an INT8 depthwise conv reads the conv's output through its
    Q/DQ, so its local figures (fp32, 36 dB) held the conv's output quantization and ranked above the conv, and
    the accumulated error first dropped at the Transpose. ONNX Runtime's fused conv returns the quantized output:
    the conv is measured after its output Q/DQ in both modes (checked against the written model run directly),
    and the Transpose, which computes nothing wrong, has no local row."""
    rng = np.random.default_rng(1)
    model = model_from_proto(_convnext_block())
    data = from_arrays({"x": rng.normal(0, 1, (6, 4, 8, 8)).astype(np.float32)}, role="validation")
    table = calibrate(model, data, "minmax").tables["minmax"]
    for target in ("ort", "tensorrt"):
        written = write_model(model, uniform_plan("int8"), table, WriteOptions(target=target))
        result = compare(model, {target: written}, data, CompareOptions(batch_size=3, bootstrap=0))
        assert not [w for w in result.warnings if "through its Q/DQ" in w]
        rows = result.per_layer.set_index(["mode", "group"])
        assert ("local", "to_nhwc") not in rows.index  # a float Transpose: no error of its own
        feeds = {"x": np.concatenate([b.feeds["x"] for b in data.batches(6)])}
        ref = models.run_ort(with_outputs(model.proto, ["dwc"]), feeds)["dwc"]
        carrier = "dwc/dq" if target == "ort" else "dwc"  # the ORT form's conv returns its output quantized
        cand = _as_written(written.proto, [carrier], feeds)[carrier]
        for mode in ("accumulated", "local"):
            assert rows.loc[(mode, "dwconv"), "sqnr_db"] == pytest.approx(_pooled_sqnr(ref, cand), abs=0.3)
        # the error enters at the conv: the Transpose passes it on unchanged
        assert rows.loc[("accumulated", "to_nhwc"), "sqnr_db"] == pytest.approx(
            rows.loc[("accumulated", "dwconv"), "sqnr_db"], abs=1e-6)


def test_an_output_qdq_an_int8_group_reads_too_is_that_groups_input_quantization():
    """The depthwise output read by the Transpose and by an INT8 1x1 conv: the Q/DQ is the 1x1 conv's input
    quantization (its local figures hold it, as in the TensorRT form), not the depthwise conv's and not the
    Transpose's; the accumulated mode still measures the depthwise conv after it, where the Transpose reads."""
    rng = np.random.default_rng(1)
    model = model_from_proto(_convnext_block(shared=True))
    data = from_arrays({"x": rng.normal(0, 1, (6, 4, 8, 8)).astype(np.float32)}, role="validation")
    table = calibrate(model, data, "minmax").tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="ort"))
    result = compare(model, {"ort": written}, data, CompareOptions(batch_size=3, bootstrap=0))
    assert not [w for w in result.warnings if "through its Q/DQ" in w]
    rows = result.per_layer.set_index(["mode", "group"])
    assert ("local", "to_nhwc") not in rows.index
    feeds = {"x": np.concatenate([b.feeds["x"] for b in data.batches(6)])}
    ref = models.run_ort(with_outputs(model.proto, ["dwc"]), feeds)["dwc"]
    cand = _as_written(written.proto, ["dwc", "dwc/dq"], feeds)
    assert rows.loc[("local", "dwconv"), "sqnr_db"] == pytest.approx(_pooled_sqnr(ref, cand["dwc"]), abs=0.3)
    assert rows.loc[("accumulated", "dwconv"), "sqnr_db"] == pytest.approx(_pooled_sqnr(ref, cand["dwc/dq"]), abs=0.3)
    assert rows.loc[("accumulated", "dwconv"), "sqnr_db"] < rows.loc[("local", "dwconv"), "sqnr_db"] - 1


def test_a_float16_io_candidate_is_refused_saying_how_to_compare_one():
    """A user's own float16 export (float16 inputs) against the FP32 reference: the same data cannot feed both, and
    the refusal says how to get a candidate that can be compared."""
    half = onnx.ModelProto()
    half.CopyFrom(models.conv_net())
    half.graph.input[0].type.tensor_type.elem_type = TensorProto.FLOAT16
    x = models.random_inputs(models.conv_net(), 2, seed=0)
    with pytest.raises(CompareError, match=r"input 'input' is float16, the reference's is float32; the same data "
                                           r"cannot feed both\. .*--precision fp16.*keep_io_types=True"):
        compare(model_from_proto(models.conv_net()), {"half": model_from_proto(half, label="half")},
                from_arrays(x, role="validation"), CompareOptions(per_layer=False, bootstrap=0))


def test_layers_after_data_dependent_routing_are_said_to_be_read_with_care():
    """A Mixtral's expert MatMuls, fed the tokens a NonZero routed to them: the per-layer table compared other
    tokens row by row (-0.4 dB accumulated where the layer measured 33 dB local) or left batches out, silently."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Squeeze", ["x1", "axis0"], ["x"], name="tokens_of_the_sample"),
         helper.make_node("MatMul", ["x", "wr"], ["gate"], name="router"),
         helper.make_node("Greater", ["gate", "zero"], ["chosen"], name="choose"),
         helper.make_node("NonZero", ["chosen"], ["where"], name="route"),
         helper.make_node("Gather", ["where", "zero_i"], ["rows"], name="token_rows", axis=0),
         helper.make_node("Gather", ["x", "rows"], ["tokens"], name="pick_tokens", axis=0),
         helper.make_node("MatMul", ["tokens", "we"], ["expert_out"], name="expert"),
         helper.make_node("ReduceSum", ["expert_out", "axis0"], ["y"], name="combine", keepdims=1)], "moe",
        [helper.make_tensor_value_info("x1", TensorProto.FLOAT, [1, "T", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [numpy_helper.from_array(rng.normal(0, 0.5, (8, 1)).astype(np.float32), "wr"),
         numpy_helper.from_array(rng.normal(0, 0.5, (8, 8)).astype(np.float32), "we"),
         numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
         numpy_helper.from_array(np.array(0, np.int64), "zero_i"),
         numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    data = from_arrays({"x1": rng.normal(0, 1, (4, 6, 8)).astype(np.float32)}, role="validation")
    table = calibrate(model, data, "minmax", batch_size=1).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    result = compare(model, {"int8": written}, data, CompareOptions(batch_size=1, bootstrap=0))
    (note,) = [w for w in result.warnings if "sized by the data" in w]
    assert "'expert_out'" in note and "judge such a model end to end" in note
