"""The models one comparison runs: the reference and each candidate as staged models (one segment
per chunk, exposing the chunk's tensors) and the local-mode models per candidate and chunk."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..backends import Backend
from ..graph import LoadedModel
from .alignment import CandidatePlan
from .islands import Island, LocalModel
from .layers import Layer, ReferenceGraph, elements_per_sample
from .schedule import BatchState
from .segments import StagedModel
from .submodel import has_subgraph

__all__ = ["Runners", "mirrored_groups"]


def mirrored_groups(p: CandidatePlan, ref: ReferenceGraph, accumulated: bool) -> set[str]:
    """Groups fed only graph inputs: with the accumulated mode, the candidate's own run already gives
    their local error, so they get no local model (known before any session exists)."""
    if not accumulated:
        return set()
    graph_inputs = set(ref.graph_inputs)
    return {g for g, island in p.islands.items()
            if set(island.boundary) <= graph_inputs and all(p.carriers.get(t) == c for t, c in island.outputs)}


class Runners:
    """Sessions of one comparison, built once and closed once (:meth:`close`).

    ``reference`` / ``candidates[name]``: staged models; ``local[name][k]``: the local
    models of chunk ``k``, the islands split in ``workers`` parts that run side by side.
    A group fed only graph inputs needs no local model when the accumulated mode runs:
    its local figures are the accumulated ones (it goes to ``CandidatePlan.mirrored``).
    """

    def __init__(self, reference: LoadedModel, ref: ReferenceGraph, plans: Mapping[str, CandidatePlan],
                 chunks: Sequence[Sequence[Layer]], accumulated: bool, local: bool, workers: int,
                 backend: Backend, candidate_backends: Mapping[str, Backend] | None = None) -> None:
        """``candidate_backends``: a candidate's own backend where it differs from ``backend`` (a TensorRT-form
        candidate run with Q/DQ as written beside an ORT-form one)."""
        self._ref = ref
        self._backend = backend
        self._own = dict(candidate_backends or {})
        self._workers = workers
        self.outputs = list(ref.outputs)
        self.k_count = max(1, len(chunks))
        layered = [p for p in plans.values() if p.written is not None and (p.carriers or p.islands)]
        self.local: dict[str, list[list[LocalModel]]] = {}
        self.notes: list[str] = []  # local-mode islands left out when their session could not be built
        self.candidates: dict[str, StagedModel] = {}
        ref_wants: list[list[str]] = [[] for _ in range(self.k_count)]
        for k, chunk in enumerate(chunks):
            ref_wants[k].extend(x.tensor for x in chunk)
        if local:
            chunk_of_group = {x.group: k for k, chunk in enumerate(chunks) for x in chunk}
            for p in layered:
                self.local[p.name] = self._local_models(p, chunk_of_group, accumulated, ref_wants)
        ref_wants[-1].extend(ref.outputs)
        ref_wants = [list(dict.fromkeys(w)) for w in ref_wants]
        self.reference = StagedModel(reference.proto, ref_wants, backend, f"reference {reference.label}")
        for name, p in plans.items():
            if accumulated and p in layered and p.carriers:
                wants: list[list[str]] = [[] for _ in range(self.k_count)]
                for k, chunk in enumerate(chunks):
                    wants[k].extend(p.carriers[x.tensor] for x in chunk if x.tensor in p.carriers)
                wants[-1].extend(ref.outputs)
                self.candidates[name] = StagedModel(p.proto, [list(dict.fromkeys(w)) for w in wants],
                                                    self._own.get(name, backend), f"candidate {name!r}")
            else:
                self.candidates[name] = StagedModel(p.proto, [list(ref.outputs)], self._own.get(name, backend),
                                                    f"candidate {name!r}")

    def _local_models(self, p: CandidatePlan, chunk_of_group: Mapping[str, int], accumulated: bool,
                      ref_wants: list[list[str]]) -> list[list[LocalModel]]:
        """The candidate's local models per chunk; what they read from the reference joins ``ref_wants``."""
        mirrored = mirrored_groups(p, self._ref, accumulated)
        p.mirrored.update(mirrored)
        per_chunk: list[list[Island]] = [[] for _ in range(self.k_count)]
        for g, island in p.islands.items():
            if g in mirrored:
                continue
            per_chunk[chunk_of_group[g]].append(island)
        models: list[list[LocalModel]] = []
        for k, islands in enumerate(per_chunk):
            parts = [lm for part in self._split(islands) if (lm := self._local_model(p, part)) is not None]
            for lm in parts:
                ref_wants[k].extend(lm.needs)
            models.append(parts)
        return models

    def _local_model(self, p: CandidatePlan, islands: list[Island]) -> LocalModel | None:
        """The local model of ``islands``; when its session cannot be built and some hold a Loop/If/Scan (cut out
        with its bodies, whose outer reads are fed from the reference), the model without those, with a note."""
        backend = self._own.get(p.name, self._backend)
        try:
            return LocalModel(p.name, p.proto, islands, backend)
        except Exception as exc:  # noqa: BLE001 - any backend's failure to build: the other islands still run
            nodes = p.proto.graph.node
            flowing = [i for i in islands if any(has_subgraph(nodes[n]) for n in i.nodes)]
            if not flowing:
                raise
            self.notes.append(f"candidate {p.name!r}: local mode skips group(s) "
                              f"{', '.join(repr(i.group) for i in flowing)}: their Loop/If/Scan, cut out and fed the "
                              f"reference's values, could not be built ({type(exc).__name__}: {str(exc)[:200]})")
            rest = [i for i in islands if i not in flowing]
            return LocalModel(p.name, p.proto, rest, backend) if rest else None

    def _split(self, islands: list[Island]) -> list[list[Island]]:
        """Islands in ``workers`` parts of similar size (activation elements in and out), so the
        local models of one chunk run side by side; each part keeps topological order."""
        if not islands:
            return []
        parts: list[list[Island]] = [[] for _ in range(min(self._workers, len(islands)))]
        load = [0] * len(parts)

        def size(island: Island) -> int:
            tensors = [dict(island.fed).get(t, t) for t in island.boundary] + [t for t, _ in island.outputs]
            return sum(elements_per_sample(self._ref.specs.get(t)) or 0 for t in tensors) or 1

        for island in sorted(islands, key=lambda i: (-size(i), i.index)):
            j = load.index(min(load))
            parts[j].append(island)
            load[j] += size(island)
        return [sorted(part, key=lambda i: i.index) for part in parts if part]

    def segments(self) -> dict[str, int]:
        """Segments per model, for the settings record."""
        return {"reference": len(self.reference.steps), **{n: len(s.steps) for n, s in self.candidates.items()}}

    def release(self, state: BatchState, k: int) -> None:
        """Drops the batch's tensors whose last reader ran in chunk ``k`` (graph outputs stay)."""
        outputs = set(self.outputs)
        for t in self.reference.release[k]:
            if t not in outputs:
                state.ref_live.pop(t, None)
        for name, staged in self.candidates.items():
            if k < len(staged.release):
                for t in staged.release[k]:
                    if t not in outputs:
                        state.cand_live[name].pop(t, None)

    def close(self) -> None:
        for staged in [self.reference, *self.candidates.values()]:
            staged.close()
        for models in self.local.values():
            for parts in models:
                for m in parts:
                    m.close()
