"""The builder's progress: a bar over its top-level phases, and a build that stops when the user interrupts it.

``build_serialized_network`` is one C++ call that can take minutes (a loop-heavy decoder: tens of minutes
on the CPU). Python runs signal handlers only between its own bytecodes, so Ctrl-C or SIGTERM waited for the
whole build. TensorRT calls an ``IProgressMonitor`` back after every step of every phase, on the thread that
called the build; the handler's exception (``Interrupted``, a KeyboardInterrupt) then raises inside the callback,
which returns False: TensorRT cancels the build, and :meth:`BuildMonitor.raise_if_interrupted` re-raises it::

    build_serialized_network ──► phase_start / step_complete ... ──► engine bytes
                                       │ SIGINT lands here: the exception is kept, step_complete returns False
                                       └──► the build returns None ──► raise_if_interrupted() raises it
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

__all__ = ["make_monitor"]


def make_monitor(trt: ModuleType, progress: bool) -> Any:
    """An ``IProgressMonitor`` of ``trt`` (TensorRT or TensorRT-RTX): a tqdm bar per top-level phase when
    ``progress``, and cancellation on an interrupt either way."""

    class BuildMonitor(trt.IProgressMonitor):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.interrupted: BaseException | None = None
            self.bars: dict[str, Any] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            try:
                if progress and parent_phase is None and num_steps > 1:
                    from tqdm.auto import tqdm

                    self.bars[phase_name] = tqdm(total=num_steps, desc=f"build: {phase_name}", unit="step",
                                                 dynamic_ncols=True, leave=False)
            except BaseException as exc:  # noqa: BLE001 - an interrupt: cancel at the next step
                self.interrupted = self.interrupted or exc

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                bar = self.bars.get(phase_name)
                if bar is not None:
                    bar.update(step + 1 - bar.n)
            except BaseException as exc:  # noqa: BLE001 - the signal handler's Interrupted, raised here
                self.interrupted = self.interrupted or exc
            return self.interrupted is None

        def phase_finish(self, phase_name: str) -> None:
            try:
                bar = self.bars.pop(phase_name, None)
                if bar is not None:
                    bar.close()
            except BaseException as exc:  # noqa: BLE001
                self.interrupted = self.interrupted or exc

        def close(self) -> None:
            for bar in self.bars.values():
                bar.close()
            self.bars.clear()

        def raise_if_interrupted(self) -> None:
            """Re-raise the interrupt that cancelled the build (the build's own failure otherwise stands)."""
            self.close()
            if self.interrupted is not None:
                raise self.interrupted

    return BuildMonitor()
