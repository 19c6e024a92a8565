"""Which of ONNX Runtime's CPU integer kernels can saturate, on this CPU and for a given model.

ORT's x86 u8 x s8 kernels without VNNI use VPMADDUBSW, whose int16 pair sums
saturate (see :mod:`quantlab.backends.ort`); these two checks let the ORT
backend fuse Q/DQ into integer kernels only where the result stays exact.
"""

from __future__ import annotations

import functools
import platform
from pathlib import Path

import numpy as np
import onnx

from ..graph import tensor_specs
from ..graph.topology import nested_graphs

__all__ = ["int8_dot_saturates", "saturation_free"]

_VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8", "avx_vnni_int8"})
_X86 = frozenset({"x86_64", "amd64", "i386", "i686", "x86"})
_INT8_KERNEL_OPS = frozenset({"Conv", "ConvTranspose", "MatMul", "Gemm"})
_SAFE_WEIGHT_QMAX = 64
"""|int8 weight| up to which 2 * 255 * |w| fits a saturating int16 pair sum."""


@functools.lru_cache(maxsize=1)
def int8_dot_saturates(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True when ONNX Runtime's u8 x s8 integer kernels may saturate on this CPU.

    That is x86 without a VNNI dot product (AVX512-VNNI, AVX-VNNI, AMX): MLAS then
    uses VPMADDUBSW, whose int16 pair sums saturate. An x86 CPU whose flags
    cannot be read counts as saturating (accuracy first); other CPUs do not.
    """
    if platform.machine().lower() not in _X86:
        return False
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return True
    for line in text.splitlines():
        if line.startswith("flags"):
            return not (set(line.partition(":")[2].split()) & _VNNI_FLAGS)
    return True


def saturation_free(model: onnx.ModelProto) -> bool:
    """True when no integer kernel ORT could fuse from ``model`` can saturate.

    Checks every DequantizeLinear feeding input 1 (the weight / B side, the
    signed operand of ORT's u8 x s8 kernels) of a Conv, ConvTranspose, MatMul
    or Gemm, in the main graph and inside If/Loop/Scan bodies (ORT fuses there
    too): a uint8 operand is exact (u8 x u8 kernels widen to int16 first);
    an int8 initializer (of the body or an enclosing graph) must lie within
    [-64, 64]; an int8 activation (activation x activation MatMul in the
    TensorRT form) can reach 127.
    """
    from onnx import numpy_helper

    specs = tensor_specs(model)
    inits = {i.name: i for g in nested_graphs(model.graph) for i in g.initializer}
    for graph in nested_graphs(model.graph):
        producers = {o: n for n in graph.node for o in n.output if o}
        for node in graph.node:
            if node.op_type not in _INT8_KERNEL_OPS or len(node.input) < 2:
                continue
            dq = producers.get(node.input[1])
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            source = dq.input[0]
            if source in inits:
                array = numpy_helper.to_array(inits[source])
                if array.dtype == np.int8 and array.size and int(np.abs(array.astype(np.int16)).max()) > _SAFE_WEIGHT_QMAX:
                    return False
            else:
                spec = specs.get(source)
                dtype = spec.dtype if spec is not None else None
                if dtype != "uint8":
                    return False
    return True
