"""Make the next batch while the model runs this one: a one-item-ahead iterator fed by a thread."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator, Iterator
from typing import Any

__all__ = ["prefetched"]


_END = object()


def prefetched(items: Iterator[Any], on_batch: Callable[[Any], None] | None) -> Generator[Any, None, None]:
    """``items`` with ``on_batch`` applied, made one item ahead in a thread.

    Batch k+1 is read, decoded and fingerprinted while the model and the
    kernels work on batch k (image decoding, hashing and ONNX Runtime release
    the GIL). Items and ``on_batch`` calls keep their order; an exception of
    the producer is raised here, at the item where it happened.
    """
    slot: queue.Queue[tuple[Any, BaseException | None]] = queue.Queue(maxsize=1)
    stop = threading.Event()

    def put(entry: tuple[Any, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                slot.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if on_batch is not None:
                    on_batch(item)
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as exc:  # handed to the consumer, raised there
            put((_END, exc))

    thread = threading.Thread(target=produce, name="quantlab-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = slot.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item
    finally:
        stop.set()
        thread.join()
