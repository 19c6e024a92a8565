"""``quantlab export triton SOURCE``: the chosen plan as a Triton Inference Server model repository entry.

    quantlab export triton reports/demo --name efficientnet --repository models/
    quantlab export triton build/ --name efficientnet --repository models/ --platform tensorrt --max-batch-size 16

SOURCE is a ``quantlab build`` folder or a ``quantlab run`` report folder (its
verdict's model: the search's final plan when the search ran). Writes
``REPOSITORY/NAME/config.pbtxt``, ``REPOSITORY/NAME/V/model.onnx`` (or
``model.plan``) and a warm-up sample; an existing entry gains a new version.
"""

from __future__ import annotations

import argparse
from typing import Any

from . import add_command, path_arg, positive_int, text_arg

__all__ = ["HELP", "register", "run"]

HELP = "release handoff: export a build or report as a Triton model"


def register(subparsers: Any) -> None:
    p = add_command(subparsers, "export", __doc__, HELP)
    targets = p.add_subparsers(dest="target", metavar="TARGET", required=True)
    t = add_command(targets, "triton", __doc__, "a Triton Inference Server model repository entry")
    t.add_argument("source", type=path_arg, help="a `quantlab build` folder or a `quantlab run` report folder")
    t.add_argument("--name", type=text_arg, required=True, help="the model's name in the repository (folder name)")
    t.add_argument("--repository", type=path_arg, required=True, metavar="DIR", help="the model repository folder")
    t.add_argument("--platform", choices=["onnxruntime", "tensorrt"], default="onnxruntime",
                   help="onnxruntime (ONNX Runtime with the TensorRT execution provider; default) or tensorrt "
                        "(the engine `quantlab build --backend tensorrt` wrote)")
    t.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                   help="Triton's max_batch_size (default 8 for a model with a dynamic batch axis, else 0)")
    t.add_argument("--dynamic-batching", action="store_true", help="let Triton batch requests together")
    t.add_argument("--instances", type=positive_int, default=1, metavar="N", help="model instances per GPU (default 1)")
    t.add_argument("--version", type=int, default=None, metavar="V",
                   help="version folder to write (default: one more than the newest)")
    t.add_argument("--candidate", type=text_arg, default=None, help="report folders: the candidate to export (default: the verdict's)")
    t.add_argument("--data", type=path_arg, default=None, metavar="TOML",
                   help="manifest whose first sample becomes the warm-up request (default: the report's "
                        "validation set; none for a build folder)")


def run(args: argparse.Namespace) -> int:
    from ..atomic import check_writable
    from ..export import TritonOptions, export_triton, resolve_source

    check_writable(args.repository / args.name, label=f"--repository {args.repository}")
    source = resolve_source(args.source, candidate=args.candidate)
    options = TritonOptions(name=args.name, platform=args.platform, max_batch_size=args.max_batch_size,
                            dynamic_batching=args.dynamic_batching, instances=args.instances, version=args.version)
    result = export_triton(source, args.repository, options, data=args.data)
    print(f"quantlab export triton: {source.label} -> {result.model_dir} version {result.version}")
    print(f"  {result.model_file.name}, max_batch_size {result.max_batch_size}, TensorRT precision "
          f"{result.precision}, warm-up {'from ' + ', '.join(result.warmup_inputs) if result.warmup_inputs else 'none'}")
    print(f"  config: {result.config_path}")
    for note in result.notes:
        print(f"  note: {note}")
    return 0
