"""ONNX Runtime backend: the default, the FP32 reference, and INT8 Q/DQ on the CPU.

Uses the CUDA / TensorRT execution providers when the installed onnxruntime
has them (TensorRT EP options from the ORT docs: fp16 / int8 enable and an
engine cache), else the CPU provider.

INT8 Q/DQ models run two ways on the CPU. Fused (ORT's default): its graph
optimiser turns ``DQ -> Conv -> Q`` into QLinearConv and friends, real integer
kernels. Unfused (``qdq_fusion=False``, session option
``session.disable_quant_qdq``): every Q/DQ runs as written and Conv/MatMul
compute in float on the dequantized values, which is exactly what the ONNX
Q/DQ semantics (and TensorRT's int32-accumulating kernels) say. The two agree
except on x86 CPUs without VNNI, where ORT's uint8 x int8 kernels use
VPMADDUBSW: it adds pairs of u8 * s8 products in *saturating* int16, so two
large products (2 * 255 * 127 = 64770 > 32767) are clipped and the result is
wrong by whole multiples of the scale (ORT's docs: "might suffer from
saturation issues"; use reduce_range or U8U8). With ``qdq_fusion=None`` (the
default) quantlab fuses only when that cannot happen: on a CPU with VNNI (or
not x86), or when every int8 operand that would be the kernel's signed side
is a weight within [-64, 64] (``WriteOptions(reduce_range=True)``).

Two environment variables force these choices from outside, for every
``OrtBackend`` that was not given the option explicitly (an argument such as
``quantlab perf --qdq-fusion on`` or ``threads=1`` wins over them):

- ``QUANTLAB_ORT_QDQ_FUSION=auto|on|off``: the ``qdq_fusion`` default (None,
  True, False). ``on`` on an x86 CPU without VNNI gives the saturated results above.
- ``QUANTLAB_ORT_THREADS=N``: ORT's intra-op thread count when ``threads`` is 0
  (N=1 gives another float32 reduction order than one thread per core).

Both are read in :func:`environment_options` only, and recorded by ``describe()``
(``forced_by_environment``). ``make test`` runs the numeric tests a second time with
``off`` and one thread: the float kernels a CPU without VNNI runs, another reduction
order, so a bound that holds for one CPU's kernels only fails there and not on a user's machine.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ..errors import BackendError, InputMismatchError
from ..graph import serialize, tensor_specs, with_outputs
from ..graph.halves import computes_in_float16
from ..graph.topology import CONTROL_FLOW_OPS, holds_qdq
from .base import Backend, BackendInfo, Runner, check_feed_names
from .nchwc import BlockedRunner, block_size, blocked_graph
from .ort_diagnostics import load_error
from .saturation import int8_dot_saturates, saturation_free

__all__ = ["OrtBackend", "OrtRunner", "int8_dot_saturates", "saturation_free", "environment_options",
           "unsafe_optimizers", "ALLOW_SPINNING", "DISABLE_QDQ_FUSION", "FUSION_ENV", "THREADS_ENV"]

DISABLE_QDQ_FUSION = "session.disable_quant_qdq"
"""ONNX Runtime session config key: "1" keeps Q/DQ nodes as written (no integer-kernel fusion)."""

ALLOW_SPINNING = "session.intra_op.allow_spinning"
"""ONNX Runtime session config key: "0" lets idle intra-op threads sleep instead of busy-waiting."""

FUSION_ENV = "QUANTLAB_ORT_QDQ_FUSION"
THREADS_ENV = "QUANTLAB_ORT_THREADS"
_FUSION_VALUES: dict[str, bool | None] = {"auto": None, "on": True, "off": False}


def environment_options(environ: Mapping[str, str] | None = None) -> tuple[bool | None, int]:
    """``(qdq_fusion, threads)`` forced by QUANTLAB_ORT_QDQ_FUSION / QUANTLAB_ORT_THREADS; ``(None, 0)`` if unset.

    The one place quantlab reads them; a bad value is an error naming the variable.
    """
    env = os.environ if environ is None else environ
    fusion_text = env.get(FUSION_ENV, "").strip().lower() or "auto"
    threads_text = env.get(THREADS_ENV, "").strip() or "0"
    if fusion_text not in _FUSION_VALUES:
        raise BackendError(f"{FUSION_ENV}={env[FUSION_ENV]!r} is not one of auto, on, off; fix or unset it")
    if not (threads_text.isascii() and threads_text.isdigit()):
        raise BackendError(f"{THREADS_ENV}={env[THREADS_ENV]!r} is not a thread count (0 = one per core); "
                           "fix or unset it")
    return _FUSION_VALUES[fusion_text], int(threads_text)


_ORT_TYPES = {
    "tensor(float)": "float32", "tensor(float16)": "float16", "tensor(double)": "float64",
    "tensor(bfloat16)": "bfloat16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(int16)": "int16", "tensor(uint16)": "uint16", "tensor(int32)": "int32",
    "tensor(uint32)": "uint32", "tensor(int64)": "int64", "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


def _quiet_run_options() -> Any:
    """Run options that keep ONNX Runtime's own log line of a failed kernel off stderr: the exception
    carries the same text, and the command prints it once, as its one-line error."""
    import onnxruntime as ort

    options = ort.RunOptions()
    options.log_severity_level = 4
    return options


class OrtRunner(Runner):
    """One ONNX Runtime session; checks feed names and dtypes so mistakes name the input."""

    def __init__(self, session: Any, output_names: Sequence[str], qdq_fusion: bool = True) -> None:
        self._session = session
        self.qdq_fusion = qdq_fusion
        self.input_names = tuple(i.name for i in session.get_inputs())
        self.output_names = tuple(output_names)
        self.providers = tuple(session.get_providers())
        self._input_dtypes = {i.name: _ORT_TYPES.get(i.type) for i in session.get_inputs()}
        self._run_options = _quiet_run_options()

    def _check_feeds(self, feeds: Mapping[str, np.ndarray]) -> None:
        check_feed_names(feeds, self.input_names, "model")
        for name in self.input_names:
            want = self._input_dtypes.get(name)
            got = np.asarray(feeds[name]).dtype.name
            if want is not None and got != want:
                raise InputMismatchError(f"input {name!r} is {got} but the model expects {want}; convert the data")

    def run(self, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        names = list(outputs) if outputs is not None else list(self.output_names)
        unknown = [n for n in names if n not in self.output_names]
        if unknown:
            raise BackendError(
                f"the session does not output {unknown}; it outputs {list(self.output_names)}. "
                "Pass intermediate tensors as outputs= when building."
            )
        self._check_feeds(feeds)
        if not names:  # ONNX Runtime reads an empty list as "every output"
            return {}
        try:
            values = self._session.run(names, dict(feeds), self._run_options)
        except Exception as exc:
            shapes = ", ".join(f"{k} {list(np.shape(v))}" for k, v in feeds.items())
            raise BackendError(f"ONNX Runtime failed to run the model on {shapes}: {exc}") from None
        return dict(zip(names, values, strict=True))


class OrtBackend(Backend):
    """ONNX Runtime. ``providers`` defaults to what is available, CPU last."""

    name = "ort"

    def __init__(
        self,
        *,
        providers: Sequence[str] | None = None,
        threads: int = 0,
        optimization: str = "all",
        trt_fp16: bool = False,
        trt_int8: bool = False,
        qdq_fusion: bool | None = None,
        spinning: bool = True,
        arena: bool = True,
    ) -> None:
        """``qdq_fusion``: True lets ORT fuse Q/DQ into integer kernels (fast), False runs
        them as written (exact Q/DQ semantics), None takes QUANTLAB_ORT_QDQ_FUSION, else
        decides per model: fused unless its kernels could saturate on this CPU (see the
        module docstring). ``threads`` 0 takes QUANTLAB_ORT_THREADS, else one per core.
        ``spinning=False`` lets ORT's idle intra-op threads sleep instead of busy-waiting
        (ORT's default): slower by a little alone, but the cores are free for other work of the
        process, such as the statistics kernels running beside the model (same results). ``arena=False``: each
        session frees its buffers after a run instead of keeping them in its own arena (ORT's default) for the
        next; a comparison holds a session per segment and candidate, and their arenas together took 12 GB on a
        text recogniser (same results)."""
        import onnxruntime as ort

        env_fusion, env_threads = environment_options()

        self._ort = ort
        available = ort.get_available_providers()
        if providers is None:
            providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        missing = [p for p in providers if p not in available]
        if missing:
            raise BackendError(
                f"ONNX Runtime {ort.__version__} has no {', '.join(missing)}; available: "
                f"{', '.join(available)}. Install onnxruntime-gpu for CUDA/TensorRT providers."
            )
        self.providers = list(providers)
        self.threads = threads or env_threads
        self.optimization = optimization
        self.trt_fp16 = trt_fp16
        self.trt_int8 = trt_int8
        self.qdq_fusion = qdq_fusion if qdq_fusion is not None else env_fusion
        self.spinning = spinning
        self.arena = arena
        self.forced_by_environment: dict[str, Any] = {}  # what the variables decided, for describe()
        if qdq_fusion is None and env_fusion is not None:
            self.forced_by_environment[FUSION_ENV] = env_fusion
        if not threads and env_threads:
            self.forced_by_environment[THREADS_ENV] = env_threads

    def fuses(self, model: onnx.ModelProto) -> bool:
        """Whether sessions for ``model`` let ORT fuse Q/DQ into integer kernels."""
        if self.qdq_fusion is not None:
            return self.qdq_fusion
        if not holds_qdq(model):
            return True
        cpu_only = all(p == "CPUExecutionProvider" for p in self.providers)
        return not (cpu_only and int8_dot_saturates()) or saturation_free(model)

    def _session_options(self, fuse: bool = True) -> Any:
        so = self._ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.log_severity_level = 3
        if not fuse:
            so.add_session_config_entry(DISABLE_QDQ_FUSION, "1")
        if not self.spinning:
            so.add_session_config_entry(ALLOW_SPINNING, "0")
        so.enable_cpu_mem_arena = self.arena
        levels = {
            "none": self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
            "basic": self._ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
            "extended": self._ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
            "all": self._ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
        }
        so.graph_optimization_level = levels[self.optimization]
        return so

    def _provider_list(self, cache_dir: Path | None) -> list[Any]:
        out: list[Any] = []
        for p in self.providers:
            if p == "TensorrtExecutionProvider":
                opts: dict[str, Any] = {"trt_fp16_enable": self.trt_fp16, "trt_int8_enable": self.trt_int8}
                if cache_dir is not None:
                    opts.update(trt_engine_cache_enable=True, trt_engine_cache_path=str(cache_dir),
                                trt_timing_cache_enable=True)
                out.append((p, opts))
            else:
                out.append(p)
        return out

    def build(
        self,
        model: onnx.ModelProto,
        *,
        outputs: Sequence[str] | None = None,
        cache_dir: Path | None = None,
    ) -> OrtRunner:
        """A session for ``model``; ``outputs`` adds intermediate tensors as graph outputs."""
        graph_outputs = [o.name for o in model.graph.output]
        extra = [n for n in (outputs or []) if n not in graph_outputs]
        proto = _with_typed_outputs(model, extra) if extra else model
        fuse = self.fuses(model)
        try:
            session = self._ort.InferenceSession(
                serialize(proto), sess_options=self._session_options(fuse),
                providers=self._provider_list(cache_dir), disabled_optimizers=list(unsafe_optimizers(model)),
            )
        except Exception as exc:
            raise load_error(self._ort.__version__, model, str(exc)) from None
        return OrtRunner(session, graph_outputs + extra, qdq_fusion=fuse)

    def build_values(self, model: onnx.ModelProto, outputs: Sequence[str]) -> Runner:
        """:meth:`build`, exposing the tensors ORT keeps in NCHWc layout as they are stored
        (quantlab.backends.nchwc): no layout conversion, same values. Any other case is :meth:`build`:
        no convolution, no NCHWc on this CPU, other providers, or a graph the rewrite cannot take
        (ORT cannot save a model over 2 GB without external data, for one)."""
        model_outputs = [o.name for o in model.graph.output]
        extra = [n for n in outputs if n not in model_outputs]
        block = block_size(self._ort)
        if (not extra or self.optimization != "all" or self.providers != ["CPUExecutionProvider"]
                or not any(n.op_type == "Conv" for n in model.graph.node) or block is None):
            return self.build(model, outputs=outputs)
        fuse = self.fuses(model)
        try:
            optimized = self.optimized_model(_with_typed_outputs(model, extra))
            graph, blocked = blocked_graph(optimized, extra, model_outputs, tensor_specs(model), block)
            if not blocked:
                return self.build(model, outputs=outputs)
            so = self._session_options(fuse)
            so.graph_optimization_level = self._ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # ORT's plan, rewritten
            session = self._ort.InferenceSession(serialize(graph), sess_options=so, providers=["CPUExecutionProvider"])
        except Exception:  # the ordinary session is always right; it raises the error that names the problem
            return self.build(model, outputs=outputs)
        runner = OrtRunner(session, [o.name for o in graph.graph.output], qdq_fusion=fuse)
        return BlockedRunner(runner, blocked, block, model_outputs + extra)

    def optimized_model(self, model: onnx.ModelProto) -> onnx.ModelProto:
        """The graph ONNX Runtime actually runs after its optimisations (fusions, layout).

        Shows whether Q/DQ pairs became QLinear* / integer kernels or stayed as
        float ops between QuantizeLinear/DequantizeLinear (the usual reason an
        INT8 model is not faster than FP32). May hold ``com.microsoft`` ops.
        """
        import tempfile

        so = self._session_options(self.fuses(model))
        with tempfile.TemporaryDirectory(prefix="quantlab-ort-opt-") as tmp:
            path = Path(tmp) / "optimized.onnx"
            so.optimized_model_filepath = str(path)
            try:
                self._ort.InferenceSession(serialize(model), sess_options=so, providers=self._provider_list(None),
                                           disabled_optimizers=list(unsafe_optimizers(model)))
            except Exception as exc:
                raise load_error(self._ort.__version__, model, str(exc)) from None
            return onnx.load(str(path))

    def profile(self, model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], runs: int = 20) -> dict[str, Any]:
        """Mean kernel time per node over ``runs`` runs (after 3 untimed ones), from ORT's profiler.

        Keys are the node names of :meth:`optimized_model`'s graph (what ORT
        runs), values ``{"op": op type, "ms": mean milliseconds per run}``:
        where the time goes, e.g. which convolutions INT8 does not speed up.
        """
        import json
        import tempfile

        if runs < 1:
            raise BackendError(f"profile needs runs >= 1, got {runs}")
        so = self._session_options(self.fuses(model))
        with tempfile.TemporaryDirectory(prefix="quantlab-ort-prof-") as tmp:
            so.enable_profiling = True
            so.profile_file_prefix = str(Path(tmp) / "profile")
            try:
                session = self._ort.InferenceSession(serialize(model), sess_options=so,
                                                     providers=self._provider_list(None),
                                                     disabled_optimizers=list(unsafe_optimizers(model)))
            except Exception as exc:
                raise load_error(self._ort.__version__, model, str(exc)) from None
            for _ in range(3 + runs):
                session.run(None, dict(feeds))
            events = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
        samples: dict[str, list[float]] = {}
        ops: dict[str, str] = {}
        for e in events:
            name = str(e.get("name", ""))
            if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
                continue
            node = name[: -len("_kernel_time")]
            samples.setdefault(node, []).append(float(e["dur"]))
            ops[node] = str(e.get("args", {}).get("op_name", "?"))
        return {node: {"op": ops[node], "ms": float(np.mean(v[-runs:])) / 1000.0} for node, v in samples.items()}

    def describe(self) -> BackendInfo:
        return BackendInfo(
            name=self.name,
            library="onnxruntime",
            version=self._ort.__version__,
            device=self._ort.get_device(),
            details={"providers": list(self.providers), "threads": self.threads or os.cpu_count(),
                     "optimization": self.optimization,
                     "qdq_fusion": "auto" if self.qdq_fusion is None else self.qdq_fusion,
                     "int8_dot_saturates": int8_dot_saturates(), "spinning": self.spinning, "arena": self.arena,
                     "forced_by_environment": dict(self.forced_by_environment)},
        )


def unsafe_optimizers(model: onnx.ModelProto) -> dict[str, str]:
    """ONNX Runtime optimizers to turn off for ``model``, each with why: those that crash the process on it.

    Both crashes below kill the process (no exception to catch, no exit code of ours), so they are avoided
    rather than caught; the model runs with the same semantics without them.

    - ``QDQPropagationTransformer``, when Q/DQ sit beside control flow: ORT 1.32 moved the DequantizeLinear of a
      conv's output past the Transpose whose output a ``Loop`` body reads by name, then aborted
      (``stl_vector.h: Assertion '__n < this->size()'``) at any optimization level from BASIC up.
    - ``NchwcTransformer``, when the model computes in float16: at ``ORT_ENABLE_ALL`` ORT 1.32 segfaults while
      it creates the session of ``Transpose -> Reshape -> Transpose -> MatMul`` in float16 (AECMOS's GRU
      output; ``tests/models.py`` ``gru_head``). NCHWc is a float32 layout, so float16 models lose
      nothing; their FP32-kept convolutions run in plain NCHW.
    """
    nodes = model.graph.node
    out: dict[str, str] = {}
    if any(n.op_type in CONTROL_FLOW_OPS for n in nodes) and any(
            n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in nodes):
        out["QDQPropagationTransformer"] = "Q/DQ beside a Loop/If/Scan: ONNX Runtime 1.32 aborts the process"
    if computes_in_float16(model):
        out["NchwcTransformer"] = "float16 compute: ONNX Runtime 1.32 can segfault creating the session"
    return out


def _with_typed_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """``model`` also outputting ``names``, with their real types (shape inference when needed).

    ONNX Runtime refuses an output declared float32 that is float16 or int8, so
    each added output needs its inferred type; an unknown name is an error here
    rather than an obscure session failure.
    """
    specs = tensor_specs(model)
    if any(n not in specs for n in names):
        try:
            inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
        except Exception:
            inferred = model
        specs = tensor_specs(inferred)
        model = inferred
    produced = {o for node in model.graph.node for o in node.output if o}
    produced |= {i.name for i in model.graph.input}
    missing = [n for n in names if n not in produced]
    if missing:
        raise BackendError(
            f"cannot expose {missing}: no node of the model produces them (check the tensor names; "
            "intermediate outputs must be activations, not initializers)"
        )
    return with_outputs(model, names)
