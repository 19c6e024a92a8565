"""One writer for INT8 (explicit Q/DQ), FP16, FP32 and mixed-precision ONNX models.

:func:`write_model` takes the FP32 model, a precision plan (per fusion group,
see :mod:`quantlab.plan`) and a calibration table, and writes a model whose
types decide every layer's precision: TensorRT 11 and TensorRT-RTX build
*strongly typed* networks, so Q/DQ nodes and float16 tensors in the ONNX are
the whole story. ONNX Runtime runs the same model (real INT8 kernels on the
CPU for ``target="ort"``, a float simulation of the TensorRT form otherwise).

Layout (arrows: who uses whom; nothing here imports compare/search/report/cli)::

    quantlab/quantize/
      write.py        write_model: check inputs ─► Placement ─► Writer ─► ONNX checker + dtype self-check
       ├─ placement.py  Placement, Slot: where every Q/DQ goes, per target (int8 groups, concat scales);
       │                all calibration errors come from here, before anything is written
       ├─ writer.py     Writer: the node-by-node pass, assembly, Provenance of the result
       │   ├─ casts.py    Casts: fp16 regions, Casts, float16 copies, fp16 simulation
       │   ├─ fp32_nodes.py  Fp32Nodes: the nodes of FP16 groups that compute in float32 (statistics, beyond fp16)
       │   ├─ write_notes.py  writing_notes: what the pass tells the user (clipped values, biases, fallbacks)
       │   ├─ qdq.py      QdqInserter: Q/DQ pairs, int8 weights, int32 biases
       │   ├─ tensors.py  TensorBook: names, dtypes, inserted nodes and initializers so far
       │   └─ subgraphs.py  fp16_subgraph: an FP16 group's Loop/Scan/If bodies, written by write_model in turn
       ├─ qparams.py    QParams, activation_qparams, weight_qparams: scales and zero points
       └─ options.py    WriteOptions, Target, DEFAULT_FP32_OPS
      bias_correction.py  measure_bias_correction, apply_bias_correction: output mean shifts folded into biases
       ├─ input_means.py   input_means, fake_quantize: E[x], E[Q(x)] of layer inputs in one FP32 pass
       ├─ bias_slots.py    bias_slot, bias_add: where a layer's bias is (its own input, or the Add after a MatMul)
       └─ bias_correction_file.py  BiasCorrection, save/load_bias_correction: the shifts and bias_correction.json
      fp32_values.py  fp32_values: chosen tensors' FP32 values batch by batch (input means, SmoothQuant maxima)
      prepare.py      prepare_model: the float rewrites before calibration (equalization, then SmoothQuant)
       ├─ equalization.py  Equalization, equalize_model: cross-layer equalization of conv pairs
       └─ smoothquant.py   SmoothQuant, measure_smoothquant: outlier activation ranges moved into weights
      provenance.py   Provenance, load_provenance: original -> written names (provenance.json)
      written.py      WrittenModel, save_written: model.onnx + provenance.json + plan.json

The graph rewrites are drawn where they are made: the int8 forms (TensorRT,
ONNX Runtime, shared concat scales) in :mod:`~quantlab.quantize.placement`, the
Q/DQ nodes in :mod:`~quantlab.quantize.qdq`, fp16 regions and the fp16
simulation in :mod:`~quantlab.quantize.casts`; the naming rule the comparator
relies on in :mod:`~quantlab.quantize.provenance`.
"""

from __future__ import annotations

from ..lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "BiasCorrection": "bias_correction_file",
    "apply_bias_correction": "bias_correction",
    "measure_bias_correction": "bias_correction",
    "save_bias_correction": "bias_correction_file",
    "load_bias_correction": "bias_correction_file",
    "BIAS_CORRECTION_FILE": "bias_correction_file",
    "Equalization": "equalization",
    "EqualizedModel": "equalization",
    "equalize_model": "equalization",
    "PreparedModel": "prepare",
    "prepare_model": "prepare",
    "prepare_rewrites": "prepare",
    "check_prepared_table": "prepare",
    "mark_table": "prepare",
    "SmoothQuant": "smoothquant",
    "measure_smoothquant": "smoothquant",
    "apply_smoothquant": "smoothquant",
    "save_smoothquant": "smoothquant",
    "load_smoothquant": "smoothquant",
    "DEFAULT_FP32_OPS": "options",
    "Target": "options",
    "WriteOptions": "options",
    "PROVENANCE_FORMAT": "provenance",
    "Provenance": "provenance",
    "load_provenance": "provenance",
    "activation_qparams": "qparams",
    "weight_qparams": "qparams",
    "write_model": "write",
    "beyond_fp16": "fp32_nodes",
    "WrittenModel": "written",
    "save_written": "written",
})


__all__ = [
    "Target",
    "DEFAULT_FP32_OPS",
    "PROVENANCE_FORMAT",
    "WriteOptions",
    "Provenance",
    "WrittenModel",
    "write_model",
    "beyond_fp16",
    "save_written",
    "load_provenance",
    "activation_qparams",
    "weight_qparams",
    "BiasCorrection",
    "measure_bias_correction",
    "apply_bias_correction",
    "save_bias_correction",
    "load_bias_correction",
    "BIAS_CORRECTION_FILE",
    "Equalization",
    "EqualizedModel",
    "equalize_model",
    "PreparedModel",
    "prepare_model",
    "prepare_rewrites",
    "check_prepared_table",
    "mark_table",
    "SmoothQuant",
    "measure_smoothquant",
    "apply_smoothquant",
    "save_smoothquant",
    "load_smoothquant",
]
