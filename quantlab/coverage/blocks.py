"""Per-sample reducers of the coverage pass, memory flat in the number of samples.

:class:`BlockCounts` keeps the coarse bin counts of consecutive blocks of
samples, for the block bootstrap of the histogram distance. The number of
blocks is bounded: when the blocks are full, adjacent pairs merge and the
block size doubles (the same trick the fine histogram uses for its range)::

    size 1: |s0|s1|s2|s3|           4 blocks full, sample s4 arrives
    size 2: |s0+s1|s2+s3|s4|  |     blocks merged pairwise, s4 starts block 2

:class:`WorstSamples` keeps the samples that saturate most (a bounded heap).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import numpy as np

__all__ = ["MAX_BLOCKS", "BlockCounts", "WorstSamples", "SampleScore"]

MAX_BLOCKS = 64
"""Blocks kept per tensor: 64 rows of ~13 counts, whatever the sample count."""


class BlockCounts:
    """Bin counts per block of consecutive samples; block size doubles when ``max_blocks`` would be exceeded."""

    def __init__(self, n_bins: int, max_blocks: int = MAX_BLOCKS) -> None:
        if max_blocks < 2 or max_blocks % 2:
            raise ValueError(f"max_blocks must be an even number >= 2, got {max_blocks}")
        self.blocks = np.zeros((max_blocks, n_bins), dtype=np.int64)
        self.size = 1
        self.samples = 0

    def add(self, rows: np.ndarray) -> None:
        """Add one row of counts per sample, in sample order."""
        for row in np.asarray(rows):
            block = self.samples // self.size
            if block == self.blocks.shape[0]:
                half = self.blocks.shape[0] // 2
                self.blocks[:half] = self.blocks[0::2] + self.blocks[1::2]
                self.blocks[half:] = 0
                self.size *= 2
                block = self.samples // self.size
            self.blocks[block] += row
            self.samples += 1

    def used(self) -> np.ndarray:
        """The non-empty blocks, ``[blocks, bins]`` (the last one may hold fewer samples)."""
        n = -(-self.samples // self.size)
        return self.blocks[:n]

    def total(self) -> np.ndarray:
        return self.blocks.sum(axis=0)


@dataclass(frozen=True, order=True)
class SampleScore:
    """How hard one sample saturates: the largest excess, over tensors, of its share of values above amax over the
    calibration set's share (what the table accepted), and in which tensor."""

    share: float
    tensors: int
    """Tensors in which at least one value of this sample saturates."""
    key: str
    tensor: str
    outside: int = 0
    """Tensors in which this sample goes beyond the calibration absmax."""

    def as_dict(self) -> dict[str, object]:
        return {"key": self.key, "worst_tensor": self.tensor, "saturated_excess": self.share,
                "tensors_saturated": self.tensors, "tensors_outside": self.outside}


class WorstSamples:
    """The ``keep`` samples with the highest :class:`SampleScore` (ties: more tensors, then key order)."""

    def __init__(self, keep: int = 10) -> None:
        self.keep = keep
        self._heap: list[SampleScore] = []

    def push(self, score: SampleScore) -> None:
        if len(self._heap) < self.keep:
            heapq.heappush(self._heap, score)
        elif self.keep and score > self._heap[0]:
            heapq.heapreplace(self._heap, score)

    def result(self) -> list[SampleScore]:
        return sorted(self._heap, reverse=True)
