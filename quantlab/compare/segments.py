"""A model run in consecutive segments, one per chunk of compared layers (bounded memory).

Metrics are running sums per tensor, updated batch by batch; no activation outlives its
batch. Each model is cut into consecutive segments, one per chunk of layers, so one pass
over the data runs every node once and holds only one chunk's tensors plus the tensors
crossing the cut::

    chunk 0 ──────────────┐        chunk 1 ──────────────┐
    [segment 0: ancestors of chunk 0] ──► live cut ──► [segment 1: what chunk 1 adds] ──► ...
        ▲ fetch chunk 0, update sums, drop             ▲ fetch chunk 1, update sums, drop

With one chunk (the usual case) the model is a single session exposing its chunk; with
``per_layer=False`` the models run as they are, exposing nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx

from ..backends import Backend, Runner
from ..errors import BackendError, CompareError
from ..graph import topological_order
from .submodel import build_runner, node_reads, submodel, typed_specs

__all__ = ["StagedModel"]


@dataclass
class _Step:
    runner: Runner | None
    inputs: tuple[str, ...]
    fetch: tuple[str, ...]


class StagedModel:
    """A model run in consecutive segments: step k computes what chunk k wants (see the module docstring).

    ``wants[k]`` are the tensors the caller reads after step k (graph outputs must be
    in the last). Each node runs in exactly one segment (the first whose wants need
    it); a tensor crossing segments stays in the caller's ``live`` dict until its
    last reader ran (``release[k]``). One chunk means one session on the whole model.
    """

    def __init__(self, proto: onnx.ModelProto, wants: Sequence[Sequence[str]], backend: Backend, label: str) -> None:
        self.label = label
        graph = proto.graph
        nodes = list(graph.node)
        inits = {i.name for i in graph.initializer}
        graph_inputs = [i.name for i in graph.input if i.name not in inits]
        self.graph_inputs = tuple(graph_inputs)
        producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
        for names in wants:
            for t in names:
                if t not in producer and t not in graph_inputs:
                    raise CompareError(f"{label}: no node produces tensor {t!r}; cannot expose it")
        if len(wants) == 1:
            extra = [t for t in dict.fromkeys(wants[0]) if t in producer and t not in {o.name for o in graph.output}]
            runner = build_runner(backend, proto, extra, label)
            fetch = tuple(t for t in dict.fromkeys(wants[0]) if t in producer)
            self.steps = [_Step(runner, tuple(graph_inputs), fetch)]
            self.release: list[set[str]] = [set()]
            return
        self._build_segments(proto, wants, backend, graph_inputs, producer)

    def _build_segments(self, proto: onnx.ModelProto, wants: Sequence[Sequence[str]], backend: Backend,
                        graph_inputs: list[str], producer: dict[str, int]) -> None:
        nodes = list(proto.graph.node)
        inits = {i.name for i in proto.graph.initializer}
        k_count = len(wants)
        reads = [node_reads(n) for n in nodes]
        seg_nodes = _segment_nodes(proto, wants, producer, reads)
        last_use: dict[str, int] = {}
        seg_inputs: list[list[str]] = []
        for k in range(k_count):
            made = {o for i in seg_nodes[k] for o in nodes[i].output if o}
            ext = [t for i in seg_nodes[k] for t in reads[i] if t not in inits and t not in made]
            ext = list(dict.fromkeys(ext))
            seg_inputs.append(ext)
            for t in ext:
                last_use[t] = max(last_use.get(t, -1), k)
        for k, names in enumerate(wants):
            for t in names:
                last_use[t] = max(last_use.get(t, -1), k)
        specs = typed_specs(proto)
        self.steps = []
        self.release = [set() for _ in range(k_count)]
        for k in range(k_count):
            made_list = [o for i in seg_nodes[k] for o in nodes[i].output if o]
            fetch = tuple(t for t in dict.fromkeys(made_list) if t in last_use)
            if not seg_nodes[k]:
                self.steps.append(_Step(None, (), ()))
                continue
            label = f"{self.label} (segment {k + 1}/{k_count})"
            sub = submodel(proto, [nodes[i] for i in seg_nodes[k]], seg_inputs[k], fetch, specs, label)
            self.steps.append(_Step(build_runner(backend, sub, [], label), tuple(seg_inputs[k]), fetch))
        for t, k in last_use.items():
            if t not in graph_inputs:
                self.release[k].add(t)

    def step(self, k: int, live: dict[str, np.ndarray]) -> None:
        s = self.steps[k]
        if s.runner is None or not s.fetch:
            return
        feeds = {t: live[t] for t in s.inputs}
        try:
            live.update(s.runner.run(feeds, list(s.fetch)))
        except BackendError as exc:
            if len(self.steps) == 1:  # its message names the model's inputs already
                raise
            # a segment's feeds are inner tensors (MobileViT's Reshape_3_output_0): name the model's inputs first
            shapes = ", ".join(f"{t!r} {list(np.shape(live[t]))}" for t in self.graph_inputs if t in live)
            raise BackendError(f"{self.label} cannot run the batch whose inputs are {shapes} (in segment {k + 1} "
                               f"of {len(self.steps)}): {exc}") from None

    def close(self) -> None:
        for s in self.steps:
            if s.runner is not None:
                s.runner.close()


def _segment_nodes(proto: onnx.ModelProto, wants: Sequence[Sequence[str]], producer: dict[str, int],
                   reads: list[list[str]]) -> list[list[int]]:
    """Node indices per segment, in topological order: each node in the first segment whose wants need it."""
    seg_of: dict[int, int] = {}
    for k, names in enumerate(wants):
        stack = [producer[t] for t in names if t in producer]
        while stack:
            idx = stack.pop()
            if idx in seg_of:
                continue
            seg_of[idx] = k
            stack.extend(producer[t] for t in reads[idx] if t in producer and producer[t] not in seg_of)
    seg_nodes: list[list[int]] = [[] for _ in range(len(wants))]
    for idx in topological_order(proto):
        if idx in seg_of:
            seg_nodes[seg_of[idx]].append(idx)
    return seg_nodes
