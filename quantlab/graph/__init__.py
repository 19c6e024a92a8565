"""ONNX models as data: safe loading (load.py) and the graph algorithms every module shares (topology.py).

    graph/
    ├── topology.py   producer/consumer maps, topological order, subgraph reads, extra outputs
    ├── light.py      shape inference and the checker on a copy without the weights' data
    ├── identities.py Identity / widening Cast / layout ops over initializers: weights again (at load)
    ├── weights.py    weights and biases computed from constants (weight_norm): computed once (at load)
    ├── batchnorm.py  BatchNormalization after a Conv folded into it (at load)
    ├── conv_bias.py  a constant per-channel Add after a Conv folded into its bias (at load)
    ├── pooling.py    a spatial ReduceMean as GlobalAveragePool (at load)
    ├── einsum.py     an Einsum that is a matrix product as Transpose/MatMul (at load)
    ├── dims.py       dynamic axes written as -1 made symbolic (at load)
    ├── usable.py     refusals: no float activation to calibrate, a model already in float16
    ├── specs.py      TensorSpec: every tensor's type and shape; the float activations in topological order
    └── load.py       load_model / model_from_proto -> LoadedModel (local functions inlined at load)
"""

from __future__ import annotations

from .load import (
    MIN_OPSET,
    LoadedModel,
    TensorSpec,
    activation_names,
    default_opset,
    load_model,
    model_from_proto,
    serialize,
    tensor_specs,
)
from .topology import (
    consumer_indices,
    consumer_map,
    initializer_map,
    outer_names,
    producer_map,
    subgraph_reads,
    topological_nodes,
    topological_order,
    with_outputs,
)
from .usable import check_float32, check_float_activations, check_not_quantized

__all__ = [
    "MIN_OPSET", "TensorSpec", "LoadedModel", "load_model", "model_from_proto", "serialize", "tensor_specs",
    "activation_names", "check_float32", "check_float_activations", "check_not_quantized", "with_outputs", "topological_order", "topological_nodes",
    "producer_map", "consumer_map", "consumer_indices", "initializer_map", "default_opset", "outer_names",
    "subgraph_reads",
]
