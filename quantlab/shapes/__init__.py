"""Input shape ranges (TensorRT optimisation profiles): parsed from ``--shapes``, derived from data.

A dynamic input needs a (min, opt, max) shape to build a TensorRT engine. Two sources:

* the user, trtexec's way: ``--shapes NAME:MIN,OPT,MAX`` (see :func:`parse_shapes`);
* the data: every shape the calibration / validation batches had (:class:`ShapeLog`),
  reduced per dimension to (smallest, most frequent, largest) (:func:`profiles_from_data`).

A dynamic dimension is never given a value the data never had: a text recognizer with
``[N, 3, 48, W]`` whose widths are 64..320 gets ``W`` in 64..320, not the old 1..32
default, whose ``W = 1`` makes the sequence reshape impossible ("kOPT values for profile 0
violate shape constraints ... reshape would change volume 0 to ..."). The batch axis is
the one exception: its minimum is 1, because a last partial batch may hold any count.

Layout (each module imports only those above it, and :mod:`quantlab.errors`)::

    quantlab/shapes/
      ranges.py     ShapeRange, parse_shapes, format_shapes, check_ranges, network_shapes:
                    the ``--shapes`` text and its check against the model's inputs
      shape_log.py  ShapeLog, BATCH_AXIS: the shapes the batches had, counted per input
      profiles.py   profiles_from_data, shapes_for_build, shapes_for_table, engine_shapes, fixed_batch_size:
                    the ranges an engine is built with, derived from the counts when no ``--shapes`` is given

This package sits beside :mod:`quantlab.graph` (it imports only the errors): the data
layer, the backends and the CLI all use it. Its names are imported from here
(``from quantlab.shapes import ShapeRange``); the modules are its layout.
"""

from __future__ import annotations

from .profiles import (
    PROFILE_BATCH,
    batch_axes_from_dict,
    data_profile_note,
    engine_shapes,
    fixed_batch_size,
    outside_profiles,
    profiles_from_data,
    range_from_shapes,
    shapes_for_build,
    shapes_for_table,
)
from .ranges import (
    SHAPES_GRAMMAR,
    ShapeRange,
    check_range_fits,
    check_ranges,
    format_shapes,
    network_shapes,
    parse_shapes,
)
from .ranges import Shape as Shape
from .shape_log import BATCH_AXIS, ShapeLog

__all__ = [
    "BATCH_AXIS",
    "PROFILE_BATCH",
    "SHAPES_GRAMMAR",
    "ShapeLog",
    "ShapeRange",
    "batch_axes_from_dict",
    "check_range_fits",
    "check_ranges",
    "engine_shapes",
    "format_shapes",
    "fixed_batch_size",
    "network_shapes",
    "outside_profiles",
    "parse_shapes",
    "profiles_from_data",
    "data_profile_note",
    "range_from_shapes",
    "shapes_for_build",
    "shapes_for_table",
]
