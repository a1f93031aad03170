# Copyright (c) radfm3d contributors. Apache-2.0.
"""``radfm3d.slicer`` against real Slicer classes from the PyPI ``slicer-core`` package: a real MRML scene, Slicer's
own NIfTI/NRRD reader (``vtkMRMLVolumeArchetypeStorageNode``), ``vtkMRMLScalarVolumeNode``,
``vtkMRMLMarkupsROINode`` (its own ``IsPointInROIWorld``), ``vtkMRMLTextNode`` and the subject hierarchy.

Covered: Slicer-read scans give the same model input as ``radfm3d.load_image`` on the file (axial, sagittal,
flipped, oblique; NIfTI and NRRD), a known box lands on the right voxels of the Slicer volume, and the remote path
(volume node -> NRRD -> real server on loopback -> boxes -> ROI nodes). Not covered here: the Qt widget (needs the
Slicer application)."""

from __future__ import annotations

import numpy as np
import pytest

import slicer  # noqa: E402 - Slicer's classes from slicer-core (the test extra)

assert hasattr(slicer, "vtkMRMLScene"), "the 'slicer' module here is not Slicer's: pip install slicer-core"
import nibabel as nib  # noqa: E402
import nrrd  # noqa: E402

from radfm3d.io import load_image  # noqa: E402
from radfm3d.slicer.nodes import (  # noqa: E402
    create_roi_nodes,
    create_text_node,
    volume_cache_key,
    volume_kji,
    volume_model_input,
    volume_modality,
)
from radfm3d.transforms import GridGeometry  # noqa: E402
from tests.serve.server_utils import CT, tiny_engine  # noqa: E402


def _rotation(axis: int, degrees: float) -> np.ndarray:
    t = np.deg2rad(degrees)
    c, s = np.cos(t), np.sin(t)
    a, b = [k for k in range(3) if k != axis]
    r = np.eye(3)
    r[a, a], r[a, b], r[b, a], r[b, b] = c, -s, s, c
    return r


SPACING = np.diag([0.8, 0.9, 2.5])
ORIENTATIONS = {
    "axial": np.eye(3),
    "sagittal": np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]),  # i -> -S, k -> R
    "flipped": np.diag([-1.0, -1.0, 1.0]),  # LPS-stored
    "oblique": _rotation(2, 20.0) @ _rotation(0, 12.0),
}


def _scan(name: str, fmt: str, folder) -> tuple[str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(1)
    data = rng.integers(-1000, 1000, size=(20, 24, 10)).astype(np.int16)
    data[4, 17, 7] = 3000
    affine = np.eye(4)
    affine[:3, :3] = ORIENTATIONS[name] @ SPACING
    affine[:3, 3] = [-12.5, 30.25, -40.0]
    if fmt == "nifti":
        path = folder / f"{name}.nii.gz"
        img = nib.Nifti1Image(data, affine)
        img.set_qform(affine, code=1)
        img.set_sform(affine, code=1)
        nib.save(img, path)
    else:
        path = folder / f"{name}.nrrd"
        lps = np.diag([-1.0, -1.0, 1.0]) @ affine[:3]
        nrrd.write(str(path), data, {"space": "left-posterior-superior", "space directions": lps[:, :3].T,
                                     "space origin": lps[:, 3], "kinds": ["domain"] * 3})
    return str(path), data, affine


def _read_with_slicer(scene, path: str):
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    scene.AddNode(storage)
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(path)
    assert storage.ReadData(node), f"Slicer could not read {path}"
    return node


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.mark.parametrize("fmt", ["nifti", "nrrd"])
@pytest.mark.parametrize("name", list(ORIENTATIONS))
def test_slicer_read_volume_gives_the_same_model_input_as_load_image(tmp_path, engine, name, fmt):
    path, data, affine = _scan(name, fmt, tmp_path)
    node = _read_with_slicer(slicer.vtkMRMLScene(), path)
    array, ras = volume_model_input(node)
    ref = load_image(path)
    np.testing.assert_allclose(ras, np.asarray(ref.affine), atol=1e-5)
    np.testing.assert_allclose(ras, affine, atol=1e-5)
    np.testing.assert_array_equal(array.astype(np.float32), np.asarray(ref[0]))
    modality = volume_modality(node)
    assert modality == (None if ref.meta["modality"] == "unknown" else ref.meta["modality"])
    from_node = engine.processor.preprocess_image(load_image(array, affine=ras, modality=modality))
    from_file = engine.processor.preprocess_image(path)
    np.testing.assert_allclose(from_node[0].numpy(), from_file[0].numpy(), atol=1e-5)
    np.testing.assert_allclose(from_node[1]["grid_affine"], from_file[1]["grid_affine"], atol=1e-5)


@pytest.mark.parametrize("name", ["oblique", "flipped"])
def test_a_known_box_lands_on_the_right_voxels_of_the_slicer_volume(tmp_path, engine, name):
    path, _, _ = _scan(name, "nifti", tmp_path)
    scene = slicer.vtkMRMLScene()
    node = _read_with_slicer(scene, path)
    array, ras = volume_model_input(node)
    prepared = engine.prepare(None, load_image(array, affine=ras, modality=volume_modality(node)))
    geometry = GridGeometry.from_dict(prepared.meta["grid_geometry"])
    text = "A mass in the liver <box>20,30,10,60,75,70</box>."
    [box] = engine.boxes(text, geometry.to_dict())
    [roi] = create_roi_nodes(scene, [box], text, node)
    assert roi.GetName() == "RadFM3D: mass in the liver" and roi.IsA("vtkMRMLMarkupsROINode")
    # every voxel centre of the Slicer volume: inside Slicer's ROI <=> inside the box on the model grid
    kji = np.stack(np.meshgrid(*[np.arange(n) for n in array.shape], indexing="ij"), -1).reshape(-1, 3)
    world = (ras @ np.c_[kji, np.ones(len(kji))].T)[:3].T
    grid = geometry.world_to_grid(world)
    lo, hi = np.asarray(box["box_grid"][:3]), np.asarray(box["box_grid"][3:])
    expected = np.all((grid > lo + 1e-6) & (grid < hi - 1e-6), axis=1)
    margin = np.all((grid > lo - 1e-6) & (grid < hi + 1e-6), axis=1) & ~expected  # on the faces
    inside = np.array([bool(roi.IsPointInROIWorld([float(v) for v in p])) for p in world])
    assert expected.sum() > 50
    assert (inside[~margin] == expected[~margin]).all()
    centre = [0.0, 0.0, 0.0]
    roi.GetCenter(centre)
    np.testing.assert_allclose(centre, box["centre_world_mm"], atol=1e-4)


def test_rois_and_text_go_under_the_volumes_study():
    scene = slicer.vtkMRMLScene()
    node = _read_with_slicer(scene, str(CT))
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    study = sh.CreateStudyItem(sh.CreateSubjectItem(sh.GetSceneItemID(), "patient"), "study")
    # the Slicer application's subject-hierarchy plugin makes an item per data node; a bare scene does not
    item = sh.GetItemByDataNode(node) or sh.CreateItem(study, node)
    sh.SetItemParent(item, study)
    box = {"corners_world_mm": [[float(x), float(y), float(z)] for x in (0, 10) for y in (0, 20) for z in (0, 5)],
           "axes_world": np.eye(3).tolist(), "box_0_99": [1, 2, 3, 4, 5, 6]}
    rois = create_roi_nodes(scene, [box, box], "cyst <box>1,2,3,4,5,6</box> and lesion <box>1,2,3,4,5,6</box>", node)
    text = create_text_node(scene, "the answer", volume_node=node)
    assert [r.GetName() for r in rois] == ["RadFM3D: cyst", "RadFM3D: lesion"]
    for n in (*rois, text):
        assert sh.GetItemParent(sh.GetItemByDataNode(n)) == study
    np.testing.assert_allclose(rois[0].GetSize(), [10, 20, 5], atol=1e-6)
    assert text.GetText() == "the answer" and rois[0].GetAttribute("radfm3d.box_0_99") == "1,2,3,4,5,6"


def test_cache_key_changes_when_the_voxels_change():
    scene = slicer.vtkMRMLScene()
    node = _read_with_slicer(scene, str(CT))
    key = volume_cache_key(node)
    assert key == volume_cache_key(node) and key[0] == node.GetID()
    array, _ = volume_kji(node)
    array[0, 0, 0] += 1
    slicer.util.updateVolumeFromArray(node, array)
    assert volume_cache_key(node) != key


def test_a_linear_parent_transform_is_applied_to_the_geometry():
    import vtk

    scene = slicer.vtkMRMLScene()
    node = _read_with_slicer(scene, str(CT))
    _, plain = volume_kji(node)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode")
    matrix = vtk.vtkMatrix4x4()
    rotation = _rotation(2, 30.0)
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, rotation[r, c])
        matrix.SetElement(r, 3, [5.0, -7.0, 11.0][r])
    transform.SetMatrixTransformToParent(matrix)
    node.SetAndObserveTransformNodeID(transform.GetID())
    key = volume_cache_key(node)
    _, moved = volume_kji(node)
    expected = np.eye(4)
    expected[:3, :3], expected[:3, 3] = rotation, [5.0, -7.0, 11.0]
    np.testing.assert_allclose(moved, expected @ plain, atol=1e-9)
    matrix.SetElement(0, 3, 6.0)
    transform.SetMatrixTransformToParent(matrix)  # the user moves the volume: a new cache key
    assert volume_cache_key(node) != key and volume_kji(node)[1][0, 3] != moved[0, 3]
