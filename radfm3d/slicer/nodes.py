# Copyright (c) radfm3d contributors. Apache-2.0.
"""MRML nodes <-> radfm3d (no Qt): works with the ``slicer`` module of the Slicer application and of the PyPI
``slicer-core`` package alike (``vtkMRMLScene``, ``vtkMRMLScalarVolumeNode``, ``vtkMRMLMarkupsROINode``,
``vtkMRMLTextNode``, ``vtkMRMLSubjectHierarchyNode``)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from radfm3d.slicer.geometry import box_label, guess_modality, kji_to_model_array, roi_parameters

__all__ = ["volume_kji", "volume_kji_geometry", "volume_model_input", "volume_modality", "volume_cache_key",
           "create_roi_nodes", "set_roi", "create_text_node"]


def _vtk_matrix_to_numpy(matrix: Any) -> np.ndarray:
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)], dtype=np.float64)


def volume_kji(node: Any) -> tuple[np.ndarray, np.ndarray]:
    """A scalar volume node -> ``(array (K, J, I), IJK -> world RAS 4x4)`` (a copy). A linear parent transform is
    applied to the geometry (boxes then come back in world RAS, where the ROI nodes are made); a non-linear one is
    refused (harden it first)."""
    from vtk.util.numpy_support import vtk_to_numpy

    image = node.GetImageData()
    if image is None or image.GetPointData().GetScalars() is None:
        raise ValueError(f"volume node {node.GetName()!r} has no image data")
    dims = image.GetDimensions()
    scalars = image.GetPointData().GetScalars()
    if scalars.GetNumberOfComponents() != 1:
        raise ValueError(f"volume node {node.GetName()!r} has {scalars.GetNumberOfComponents()} components; "
                         "give a scalar volume")
    array = vtk_to_numpy(scalars).reshape(dims[2], dims[1], dims[0]).copy()
    return array, volume_kji_geometry(node)


def volume_model_input(node: Any) -> tuple[np.ndarray, np.ndarray]:
    """A scalar volume node -> ``(array (I, J, K), affine RAS mm)``, what :func:`radfm3d.io.load_image` takes as
    ``load_image(array, affine=affine)`` (and gives for the same scan read from its file)."""
    return kji_to_model_array(*volume_kji(node))


def volume_modality(node: Any, array: np.ndarray | None = None) -> str | None:
    """The node's modality: its ``DICOM.Modality`` attribute (node or subject-hierarchy item, as Slicer's DICOM
    import sets it), else :func:`radfm3d.slicer.geometry.guess_modality` on its voxels (``None``: unknown)."""
    value = node.GetAttribute("DICOM.Modality")
    if not value and node.GetScene() is not None:
        try:
            import slicer

            sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(node.GetScene())
            item = sh.GetItemByDataNode(node) if sh is not None else 0
            value = sh.GetItemAttribute(item, "DICOM.Modality") if item else ""
        except (ImportError, AttributeError):
            value = ""
    if value:
        return str(value)
    return guess_modality(volume_kji(node)[0] if array is None else array)


def volume_cache_key(node: Any) -> tuple[str, int, int]:
    """``(node ID, modified time, geometry digest)``: changes when the voxels, the node or its world geometry (a
    parent transform included) change."""
    import zlib

    image = node.GetImageData()
    mtime = int(max(node.GetMTime(), image.GetMTime() if image is not None else 0))
    geometry = 0
    if node.GetParentTransformNode() is not None:  # a transform edit does not touch the node's own modified time
        geometry = zlib.crc32(np.ascontiguousarray(volume_kji_geometry(node)).tobytes())
    return str(node.GetID()), mtime, int(geometry)


def volume_kji_geometry(node: Any) -> np.ndarray:
    """The node's IJK -> world RAS 4x4 (its IJKToRAS with a linear parent transform applied)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = _vtk_matrix_to_numpy(matrix)
    parent = node.GetParentTransformNode()
    if parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise ValueError(f"volume node {node.GetName()!r} is under a non-linear transform; harden it first")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        ijk_to_ras = _vtk_matrix_to_numpy(to_world) @ ijk_to_ras
    return ijk_to_ras


def set_roi(roi: Any, params: Mapping[str, Any]) -> Any:
    """Place a ``vtkMRMLMarkupsROINode`` from :func:`radfm3d.slicer.geometry.roi_parameters` (RAS mm)."""
    import vtk

    matrix = vtk.vtkMatrix4x4()
    axes = np.asarray(params["orientation"], dtype=np.float64)
    centre = np.asarray(params["center"], dtype=np.float64)
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, float(axes[r, c]))
        matrix.SetElement(r, 3, float(centre[r]))
    roi.SetROIType(roi.ROITypeBox)
    roi.SetAndObserveObjectToNodeMatrix(matrix)
    roi.SetCenter(*[float(v) for v in centre])
    roi.SetSize(*[float(v) for v in params["size"]])
    return roi


def _study_item(scene: Any, volume_node: Any) -> int | None:
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    if sh is None or volume_node is None:
        return None
    item = sh.GetItemByDataNode(volume_node)
    if not item:
        return None
    parent = sh.GetItemParent(item)
    return parent if parent and parent != sh.GetSceneItemID() else None


def _place_in_hierarchy(scene: Any, node: Any, parent_item: int | None) -> None:
    import slicer

    if parent_item is None:
        return
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = sh.GetItemByDataNode(node) or sh.CreateItem(parent_item, node)
    sh.SetItemParent(item, parent_item)


def create_roi_nodes(scene: Any, boxes: Sequence[Mapping[str, Any]], text: str = "", volume_node: Any = None,
                     prefix: str = "RadFM3D") -> list[Any]:
    """One ``vtkMRMLMarkupsROINode`` per box, named ``"<prefix>: <finding>"`` after the words before the box in
    ``text``, placed exactly (all 8 corners; oblique and flipped volumes included) and put under the volume's study
    in the subject hierarchy when it has one."""
    study = _study_item(scene, volume_node)
    nodes = []
    for k, box in enumerate(boxes):
        roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode", f"{prefix}: {box_label(text, k)}")
        try:
            roi.CreateDefaultDisplayNodes()
        except Exception:  # noqa: BLE001 - no displayable managers (e.g. a bare scene): the geometry is what matters
            pass
        set_roi(roi, roi_parameters(box))
        roi.SetAttribute("radfm3d.box_0_99", ",".join(str(int(v)) for v in box.get("box_0_99", [])))
        _place_in_hierarchy(scene, roi, study)
        nodes.append(roi)
    return nodes


def create_text_node(scene: Any, text: str, name: str = "RadFM3D answer", volume_node: Any = None) -> Any:
    """A ``vtkMRMLTextNode`` holding the answer, under the volume's study when it has one."""
    node = scene.AddNewNodeByClass("vtkMRMLTextNode", name)
    node.SetText(text)
    _place_in_hierarchy(scene, node, _study_item(scene, volume_node))
    return node
