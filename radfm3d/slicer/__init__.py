# Copyright (c) radfm3d contributors. Apache-2.0.
"""3D Slicer integration logic, without Qt: volume nodes -> model input, answer boxes -> ROI nodes, and the local
runner (model in process) beside the torch-free remote client (:mod:`radfm3d.client`).

- :mod:`radfm3d.slicer.geometry`: numpy only (KJI <-> IJK arrays, ROI parameters from boxes, NRRD writer).
- :mod:`radfm3d.slicer.nodes`: MRML node helpers (Slicer's ``slicer`` module or the ``slicer-core`` package).
- :mod:`radfm3d.slicer.runner`: :class:`LocalRunner` (needs torch; imported lazily).
"""

from __future__ import annotations

from radfm3d.slicer.geometry import box_label, kji_to_model_array, model_array_to_kji, roi_parameters, write_nrrd

__all__ = ["box_label", "kji_to_model_array", "model_array_to_kji", "roi_parameters", "write_nrrd", "LocalRunner"]


def __getattr__(name: str):
    if name == "LocalRunner":
        from radfm3d.slicer.runner import LocalRunner

        return LocalRunner
    raise AttributeError(f"module 'radfm3d.slicer' has no attribute {name!r}")
