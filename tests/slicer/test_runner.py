# Copyright (c) radfm3d contributors. Apache-2.0.
"""Local mode (``LocalRunner``) and Remote mode (``RadFM3DClient`` against a real uvicorn server on loopback) on a
volume node read by Slicer's own reader (``slicer-core``): the same answer both ways, the preprocessing cache keyed
by (node ID, modified time), cancel, and boxes -> ROI nodes."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import slicer  # noqa: E402 - Slicer's classes from slicer-core (the test extra)

assert hasattr(slicer, "vtkMRMLScene"), "the 'slicer' module here is not Slicer's: pip install slicer-core"

from radfm3d.client import RadFM3DClient  # noqa: E402
from radfm3d.slicer import LocalRunner, write_nrrd  # noqa: E402
from radfm3d.slicer.nodes import create_roi_nodes, volume_cache_key, volume_kji, volume_modality  # noqa: E402
from tests.serve.server_utils import CT, ThreadedServer, tiny_engine  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return tiny_engine()


@pytest.fixture(scope="module")
def scene_and_node():
    scene = slicer.vtkMRMLScene()
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    node = slicer.vtkMRMLScalarVolumeNode()
    scene.AddNode(node)
    scene.AddNode(storage)
    node.SetName("ct_abdomen")
    node.SetAndObserveStorageNodeID(storage.GetID())
    storage.SetFileName(str(CT))
    assert storage.ReadData(node)
    return scene, node


def _add(runner, node):
    array, ijk_to_ras = volume_kji(node)
    return runner.add_volume(array, ijk_to_ras, volume_cache_key(node), node.GetName(), volume_modality(node, array))


def test_local_and_remote_give_the_same_answer_for_a_slicer_volume(engine, scene_and_node, tmp_path):
    scene, node = scene_and_node
    runner = LocalRunner(engine=engine)
    info = _add(runner, node)
    local = runner.ask(info["id"], "Locate the liver.", max_tokens=12)

    from radfm3d.serve.app import ServeSettings, create_app

    with ThreadedServer(create_app(engine, ServeSettings(api_keys=["k"]))) as server:
        client = RadFM3DClient(server.url, api_key="k")
        array, ijk_to_ras = volume_kji(node)
        uploaded = client.upload(write_nrrd(tmp_path / "ct_abdomen.nrrd", array, ijk_to_ras))
        np.testing.assert_allclose(uploaded["geometry"]["affine_ras"], ijk_to_ras, atol=1e-5)
        remote = client.ask(uploaded["id"], "Locate the liver.", max_tokens=12)
    assert remote.text == local.text and remote.usage == local.usage
    np.testing.assert_allclose(remote.images[0]["grid_geometry"]["grid_affine"],
                               local.images[0]["grid_geometry"]["grid_affine"], atol=1e-6)
    # boxes of an answer become ROI nodes in the scene, whichever mode produced them
    [box] = engine.boxes("liver <box>10,20,30,40,50,60</box>", remote.images[0]["grid_geometry"])
    [roi] = create_roi_nodes(scene, [box], "liver <box>10,20,30,40,50,60</box>", node)
    assert roi.GetName() == "RadFM3D: liver"
    assert roi.IsPointInROIWorld(box["centre_world_mm"]) and not roi.IsPointInROIWorld(
        list(np.asarray(box["box_world_mm"][3:]) + 1.0))


def test_preprocessing_is_cached_by_node_id_and_modified_time(engine, scene_and_node):
    scene, node = scene_and_node
    runner = LocalRunner(engine=engine)
    info = _add(runner, node)
    runner.ask(info["id"], "Is this a CT?", max_tokens=2)
    hits, misses = engine.cache_hits, engine.cache_misses
    runner.ask(info["id"], "Which region?", max_tokens=2)
    assert (engine.cache_hits, engine.cache_misses) == (hits + 1, misses)
    array, _ = volume_kji(node)
    array[:, :, :10] = -1000
    slicer.util.updateVolumeFromArray(node, array)  # the user edited the volume: a new key, preprocessed again
    info2 = _add(runner, node)
    assert info2["id"] == info["id"]
    runner.ask(info2["id"], "Which region?", max_tokens=2)
    assert engine.cache_misses == misses + 1


def test_cancel_stops_local_generation(engine, scene_and_node):
    _, node = scene_and_node
    runner = LocalRunner(engine=engine)
    info = _add(runner, node)
    full = runner.ask(info["id"], "Describe.", max_tokens=30)
    cancel = threading.Event()
    pieces: list[str] = []

    def on_delta(piece: str) -> None:
        pieces.append(piece)
        cancel.set()

    partial = runner.ask(info["id"], "Describe.", max_tokens=30, on_delta=on_delta, cancel=cancel)
    assert partial.finish_reason == "cancelled"
    assert partial.usage["completion_tokens"] < full.usage["completion_tokens"]
    assert full.text.startswith("".join(pieces))
