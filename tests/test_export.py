"""Triton export: configs parsed by Triton's own ModelConfig message, I/O checked against ONNX Runtime,
the warm-up request run and compared with the comparator's candidate, versions never overwritten,
and (where nvidia-pytriton's bundled server is installed) the real tritonserver reading the repository."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from quantlab.calibrate import calibrate
from quantlab.cli import main as cli_main
from quantlab.data import open_dataset
from quantlab.errors import ExperimentError
from quantlab.export import TritonOptions, export_triton, resolve_source
from quantlab.export.config import ModelIO, model_config
from quantlab.export.pbtxt import render
from quantlab.graph import TensorSpec, model_from_proto
from quantlab.plan import uniform_plan
from quantlab.quantize import WriteOptions, save_written, write_model

import models

text_format = pytest.importorskip("google.protobuf.text_format")
model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2")


def parse_config(path: Path) -> object:
    """Triton's ModelConfig from a config.pbtxt: unknown fields, wrong types or enum values raise."""
    return text_format.Parse(path.read_text(encoding="utf-8"), model_config_pb2.ModelConfig())


@pytest.fixture
def build(tmp_path: Path) -> tuple[Path, Path, object]:
    """A real INT8 build folder of conv_net (TensorRT Q/DQ form) and a validation manifest."""
    proto = models.conv_net()
    model = model_from_proto(proto, label="conv_net")
    x = models.random_inputs(proto, 12, seed=3)["input"]
    np.savez(tmp_path / "val.npz", input=x)
    manifest = tmp_path / "val.toml"
    manifest.write_text('role = "validation"\nshuffle = false\n[[source]]\nkind = "npz"\npath = "val.npz"\n'
                        "batched = true\n")
    table = calibrate(model, open_dataset(manifest), ["minmax"]).tables["minmax"]
    written = write_model(model, uniform_plan("int8"), table, WriteOptions(target="tensorrt"))
    folder = tmp_path / "build"
    folder.mkdir()
    save_written(written, folder)
    return folder, manifest, written


def test_config_parses_as_triton_model_config_and_matches_the_model(build, tmp_path: Path) -> None:
    folder, manifest, _ = build
    options = TritonOptions(name="convnet", dynamic_batching=True, instances=2)
    result = export_triton(resolve_source(folder), tmp_path / "repo", options, data=manifest)
    config = parse_config(result.config_path)
    assert config.name == "convnet" and config.platform == "onnxruntime_onnx"
    assert config.max_batch_size == 8 and list(config.dynamic_batching.preferred_batch_size) == [4, 8]
    assert config.instance_group[0].count == 2
    assert config.instance_group[0].kind == model_config_pb2.ModelInstanceGroup.KIND_GPU
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.name == "tensorrt" and accel.parameters["precision_mode"] == "INT8"
    assert accel.parameters["trt_profile_max_shapes"] == "input:8x3x16x16"

    session = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"])
    dtype_names = {"tensor(float)": model_config_pb2.TYPE_FP32}
    for declared, actual in ((config.input, session.get_inputs()), (config.output, session.get_outputs())):
        assert [t.name for t in declared] == [t.name for t in actual]
        for t, a in zip(declared, actual):
            assert t.data_type == dtype_names[a.type]
            assert list(t.dims) == [d if isinstance(d, int) else -1 for d in a.shape[1:]]  # batch axis dropped


def test_warmup_request_runs_and_matches_the_candidate(build, tmp_path: Path) -> None:
    folder, manifest, written = build
    result = export_triton(resolve_source(folder), tmp_path / "repo", TritonOptions(name="convnet"), data=manifest)
    config = parse_config(result.config_path)
    warm = config.model_warmup[0]
    feeds = {}
    for name, spec in warm.inputs.items():
        raw = (result.model_dir / "warmup" / spec.input_data_file).read_bytes()
        assert spec.data_type == model_config_pb2.TYPE_FP32
        feeds[name] = np.frombuffer(raw, dtype=np.float32).reshape([warm.batch_size, *spec.dims])
    served = ort.InferenceSession(str(result.model_file), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    # the written model in the same plain session: same bytes, same kernels on any CPU (quantlab's backend may
    # run Q/DQ unfused where Triton's ONNX Runtime fuses them: QUANTLAB_ORT_QDQ_FUSION, a CPU without VNNI)
    expected = ort.InferenceSession(written.proto.SerializeToString(),
                                    providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    np.testing.assert_array_equal(served, expected)  # same bytes, same backend: identical outputs
    sample = open_dataset(manifest).sample(0).feeds["input"]
    np.testing.assert_array_equal(feeds["input"][0], sample)


def test_new_versions_and_refusals(build, tmp_path: Path) -> None:
    folder, manifest, _ = build
    repo = tmp_path / "repo"
    first = export_triton(resolve_source(folder), repo, TritonOptions(name="m"), data=manifest)
    second = export_triton(resolve_source(folder), repo, TritonOptions(name="m"))
    assert (first.version, second.version) == (1, 2)
    assert (repo / "m" / "1" / "model.onnx").is_file() and (repo / "m" / "2" / "export.json").is_file()
    (repo / "m" / "7").mkdir()
    (repo / "m" / "7" / "model.onnx").write_bytes(b"someone else's")
    with pytest.raises(ExperimentError, match=r"7: exists and was not written by quantlab"):
        export_triton(resolve_source(folder), repo, TritonOptions(name="m", version=7))
    assert (repo / "m" / "7" / "model.onnx").read_bytes() == b"someone else's"
    assert export_triton(resolve_source(folder), repo, TritonOptions(name="m", version=2)).version == 2
    config = repo / "m" / "config.pbtxt"
    config.write_text(config.read_text() + "# tuned by hand\n")
    with pytest.raises(ExperimentError, match=r"config.pbtxt: was edited since quantlab wrote it"):
        export_triton(resolve_source(folder), repo, TritonOptions(name="m"))
    (repo / "other").mkdir()
    (repo / "other" / "config.pbtxt").write_text('name: "other"\n')
    with pytest.raises(ExperimentError, match=r"other/config.pbtxt: was not written by quantlab"):
        export_triton(resolve_source(folder), repo, TritonOptions(name="other"))


def test_model_without_batch_axis_and_bad_options(tmp_path: Path) -> None:
    proto = models.conv_net()
    proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    proto.graph.output[0].type.tensor_type.shape.dim[0].dim_value = 1
    model = model_from_proto(proto, label="fixed")
    folder = tmp_path / "build"
    folder.mkdir()
    save_written(write_model(model, uniform_plan("fp16"), None), folder)
    result = export_triton(resolve_source(folder), tmp_path / "repo", TritonOptions(name="fixed"))
    config = parse_config(result.config_path)
    assert config.max_batch_size == 0 and list(config.input[0].dims) == [1, 3, 16, 16]
    accel = config.optimization.execution_accelerators.gpu_execution_accelerator[0]
    assert accel.parameters["precision_mode"] == "FP16"
    with pytest.raises(ExperimentError, match=r"tensor 'input' has no dynamic batch axis 0.*--max-batch-size 0"):
        export_triton(resolve_source(folder), tmp_path / "repo", TritonOptions(name="f2", max_batch_size=4))
    with pytest.raises(ExperimentError, match=r"holds no TensorRT engine"):
        export_triton(resolve_source(folder), tmp_path / "repo", TritonOptions(name="f3", platform="tensorrt"))
    with pytest.raises(ExperimentError, match=r"--name 'a/b'"):
        export_triton(resolve_source(folder), tmp_path / "repo", TritonOptions(name="a/b"))
    with pytest.raises(ExperimentError, match=r"not a `quantlab build` folder"):
        resolve_source(tmp_path)


def test_a_sequence_output_is_refused_by_name_and_nothing_is_written(tmp_path: Path) -> None:
    """Triton serves tensors: a SequenceConstruct output was an internal error (ValueError on dtype 'undefined')."""
    from onnx import TensorProto, helper, numpy_helper

    from quantlab.errors import ModelError

    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm"),
             helper.make_node("SequenceConstruct", ["y", "y"], ["seq"], name="seq")]
    graph = helper.make_graph(
        nodes, "sequence_output", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4]),
         helper.make_tensor_sequence_value_info("seq", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    model = model_from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))
    folder = tmp_path / "build"
    folder.mkdir()
    save_written(write_model(model, uniform_plan("fp16"), None), folder)
    with pytest.raises(ModelError, match=r"'seq' is a sequence or map, not a tensor"):
        export_triton(resolve_source(folder), tmp_path / "repo", TritonOptions(name="seqm"))
    assert not (tmp_path / "repo" / "seqm").exists()


def test_hostile_tensor_names_are_escaped_and_tensorrt_plan_config_parses(tmp_path: Path) -> None:
    name = 'in"put\\\n}\nplatform: "evil'
    io = ModelIO(inputs=(TensorSpec(name, "float32", ("N", 4)),), outputs=(TensorSpec("é", "int64", ("N",)),))
    for platform in ("tensorrt", "onnxruntime"):
        text = render(model_config(TritonOptions(name="x", platform=platform), io, max_batch_size=4,
                                   precision="INT8", preferred_batch_sizes=[4], profiles={},
                                   warmup=None, parameters={"quantlab_note": name}))
        path = tmp_path / f"{platform}.pbtxt"
        path.write_text(text)
        config = parse_config(path)
        assert config.input[0].name == name and config.output[0].name == "é"
        assert config.output[0].data_type == model_config_pb2.TYPE_INT64 and list(config.output[0].dims) == []
        assert config.platform == {"tensorrt": "tensorrt_plan", "onnxruntime": "onnxruntime_onnx"}[platform]


def test_report_folder_exports_the_verdicts_model_and_cli(build, tmp_path: Path, capsys) -> None:
    folder, manifest, _ = build
    report = tmp_path / "reports" / "exp"
    (report / "stages" / "build-int8-minmax").mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, report / "stages" / "build-int8-minmax" / f.name)
    (report / "manifest.json").write_text(json.dumps({
        "status": "complete", "verdict": {"candidate": "int8-minmax"},
        "validation": {"manifest": str(manifest)}}))
    source = resolve_source(report)
    assert source.folder == report / "stages" / "build-int8-minmax" and source.validation == manifest
    code = cli_main(["export", "triton", str(report), "--name", "exp", "--repository", str(tmp_path / "repo"),
                     "--dynamic-batching"])
    assert code == 0
    assert "version 1" in capsys.readouterr().out
    assert parse_config(tmp_path / "repo" / "exp" / "config.pbtxt").model_warmup[0].inputs["input"].dims == [3, 16, 16]
    assert cli_main(["export", "triton", str(report), "--name", "exp", "--repository", str(tmp_path / "repo"),
                     "--candidate", "fp16"]) == 2
    assert "no candidate 'fp16'" in capsys.readouterr().err
    # a search folder an earlier run left: this run (its manifest's stages) made none, so it is not exported
    (report / "stages" / "search" / "final").mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copy(f, report / "stages" / "search" / "final" / f.name)
    (report / "manifest.json").write_text(json.dumps({
        "status": "complete", "verdict": {"candidate": "int8-minmax"}, "validation": {"manifest": str(manifest)},
        "stages": [{"name": "calibrate"}, {"name": "build-int8-minmax"}, {"name": "compare"}]}))
    with pytest.raises(ExperimentError, match=r"made no search.*earlier run's plan.*int8-minmax"):
        resolve_source(report, candidate="mixed (search)")
    assert resolve_source(report).folder == report / "stages" / "build-int8-minmax"


def _tritonserver() -> Path | None:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        return None
    binary = Path(next(iter(spec.submodule_search_locations))) / "tritonserver" / "bin" / "tritonserver"
    return binary if binary.is_file() else None


@pytest.mark.skipif(_tritonserver() is None, reason="nvidia-pytriton (which bundles tritonserver) is not installed")
def test_real_tritonserver_reads_the_exported_repository(build, tmp_path: Path) -> None:
    """pytriton's server ships only the Python backend: it parses and validates our config, then reports
    that the onnxruntime backend library is missing. A malformed config fails earlier, with another error."""
    folder, manifest, _ = build
    repo = tmp_path / "repo"
    export_triton(resolve_source(folder), repo, TritonOptions(name="convnet", dynamic_batching=True), data=manifest)
    binary = _tritonserver()
    assert binary is not None

    def serve() -> str:
        proc = subprocess.run(
            [str(binary), f"--model-repository={repo}", f"--backend-directory={binary.parent.parent / 'backends'}",
             "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false", "--exit-on-error=true", "--exit-timeout-secs=1"],
            capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr

    log = serve()
    assert "failed to load 'convnet' version 1" in log
    assert "unable to find backend library for backend 'onnxruntime'" in log
    config = repo / "convnet" / "config.pbtxt"
    config.write_text(config.read_text().replace("max_batch_size: 8", "max_batch_size: eight"))
    log = serve()
    assert "unable to find backend library" not in log and "convnet" in log


def test_a_mixed_int8_fp16_plan_is_told_its_fp16_groups_cannot_run_in_fp16_on_tritons_accelerator(build, tmp_path, capsys):
    """Triton's ONNX Runtime backend maps precision_mode INT8 to trt_int8_enable alone (and refuses the
    trt_fp16_enable key): the FP16 groups of a search's mixed plan cannot run in FP16 there. The export says so, and
    how to run them in FP16; an all-INT8 export says nothing."""
    from quantlab.plan import PrecisionPlan

    folder, manifest, written = build
    first = next(g.name for g in written.plan.groups if g.quantizable)
    table = calibrate(model_from_proto(models.conv_net()), open_dataset(manifest), ["minmax"]).tables["minmax"]
    mixed = write_model(model_from_proto(models.conv_net(), label="conv_net"),
                        PrecisionPlan(default="int8", overrides={first: "fp16"}), table, WriteOptions(target="tensorrt"))
    assert mixed.plan.precision[first] == "fp16"
    mixed_folder = tmp_path / "mixed"
    mixed_folder.mkdir()
    save_written(mixed, mixed_folder)
    assert export_triton(resolve_source(folder), tmp_path / "repo", TritonOptions(name="int8")).notes == ()
    assert cli_main(["export", "triton", str(mixed_folder), "--repository", str(tmp_path / "repo"),
                     "--name", "mixed"]) == 0
    out = capsys.readouterr().out
    assert "TensorRT precision INT8" in out
    assert "note: precision_mode INT8 gives TensorRT no FP16 flag" in out
    assert "the plan's 1 FP16 group(s) cannot run in FP16" in out and "--platform tensorrt" in out
