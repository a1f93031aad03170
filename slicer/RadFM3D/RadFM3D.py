# Copyright (c) radfm3d contributors. Apache-2.0.
"""RadFM3D: ask a 3D radiology vision-language model about the volume on screen, in 3D Slicer.

A thin scripted module: the widget collects the input and shows the answer; everything else is
``radfm3d.slicer`` (volume node -> model input, boxes -> ROI nodes, local runner) and ``radfm3d.client``
(torch-free remote client). Local mode runs the model inside Slicer's Python (radfm3d and torch are installed on
first use, never at import); Remote mode talks to ``radfm3d serve`` and needs no torch.
"""

from __future__ import annotations

import os
import queue
import sys
import tempfile
import threading
import time
import traceback

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

TASKS = {
    "Report": "Please provide the FINDINGS and IMPRESSION for this study.",
    "Question": "Is there a focal lesion? Answer and give its box.",
    "Locate": "Locate the liver.",
}
SETTINGS = "RadFM3D/"


def _ensure_radfm3d(source_dir: str = "", need_torch: bool = False) -> None:
    """Make ``radfm3d`` importable: a source checkout folder is put on ``sys.path``; otherwise (Local mode only)
    it is pip-installed into Slicer's Python after the user agrees. Never runs at module import."""
    if source_dir and os.path.isdir(source_dir) and source_dir not in sys.path:
        sys.path.insert(0, source_dir)
    try:
        import radfm3d.slicer.geometry  # noqa: F401
        if need_torch:
            import torch  # noqa: F401
        return
    except ImportError:
        if not need_torch:
            raise RuntimeError("Remote mode needs the radfm3d source folder (pure Python: radfm3d.client and "
                               "radfm3d.slicer, no torch): set 'radfm3d folder'") from None
    if not slicer.util.confirmOkCancelDisplay(
            "RadFM3D Local mode needs radfm3d (and torch) in Slicer's Python. Install them now with pip? "
            "This can take several minutes."):
        raise RuntimeError("radfm3d is not installed: set the radfm3d source folder, or use Remote mode")
    target = f"-e {source_dir}" if source_dir and os.path.isfile(os.path.join(source_dir, "setup.cfg")) else "radfm3d"
    slicer.util.pip_install(target)


# ------------------------------------------------------------------------------------------------ module
class RadFM3D(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "RadFM3D"
        self.parent.categories = ["Radiology"]
        self.parent.contributors = ["radfm3d contributors"]
        self.parent.helpText = (
            "Ask a 3D radiology vision-language model about a volume: a report, a question, or where a finding is. "
            "Boxes come back as ROI nodes in RAS. Local mode runs the model in Slicer; Remote mode uses a "
            "'radfm3d serve' server (see docs/slicer.md). Research use only, not a medical device.")
        self.parent.acknowledgementText = "radfm3d: a MONAI-native toolkit for 3D radiology VLMs (Apache-2.0)."


# ------------------------------------------------------------------------------------------------ logic
class RadFM3DLogic(ScriptedLoadableModuleLogic):
    """Runs a question on a volume node in Local or Remote mode (no widgets; callable from the Python console)."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.runner = None  # radfm3d.slicer.LocalRunner, kept loaded
        self.runner_model = None
        self.uploads = {}  # (url, node id, modified time) -> server file id

    def local_runner(self, model):
        from radfm3d.slicer import LocalRunner

        if self.runner is None or self.runner_model != model:
            self.runner, self.runner_model = LocalRunner(model), model
        return self.runner

    @staticmethod
    def read_volume(volume_node):
        """The node's voxels and geometry as plain data (call on the GUI thread; the result may go to a worker)."""
        from radfm3d.slicer.nodes import volume_cache_key, volume_kji, volume_modality

        array, ijk_to_ras = volume_kji(volume_node)
        return {"array": array, "ijk_to_ras": ijk_to_ras, "key": volume_cache_key(volume_node),
                "name": volume_node.GetName() or "volume", "modality": volume_modality(volume_node, array)}

    def ask(self, volume, prompt, mode="Local", model="", url="", api_key="", max_tokens=256,
            on_delta=None, cancel=None):
        """Answer ``prompt`` about ``volume`` (a volume node, or :meth:`read_volume`'s result); returns a
        ``radfm3d.client.Answer``. Blocks while the model generates: the widget calls it from a worker thread."""
        if not isinstance(volume, dict):
            volume = self.read_volume(volume)
        array, ijk_to_ras, key = volume["array"], volume["ijk_to_ras"], volume["key"]
        if mode == "Local":
            runner = self.local_runner(model)
            info = runner.add_volume(array, ijk_to_ras, key, volume["name"], volume["modality"])
            return runner.ask(info["id"], prompt, max_tokens=max_tokens, on_delta=on_delta, cancel=cancel)
        from radfm3d.client import RadFM3DClient
        from radfm3d.slicer.geometry import write_nrrd

        client = RadFM3DClient(url, api_key=api_key or None)
        upload_key = (url, *key)
        file_id = self.uploads.get(upload_key)
        if file_id is None:
            with tempfile.TemporaryDirectory() as tmp:
                path = write_nrrd(os.path.join(tmp, "volume.nrrd"), array, ijk_to_ras)
                file_id = client.upload(path, filename=f"{volume['name']}.nrrd")["id"]
            self.uploads[upload_key] = file_id
        return client.ask(file_id, prompt, max_tokens=max_tokens, on_delta=on_delta, cancel=cancel)

    def show_results(self, volume_node, answer):
        """ROI nodes (one per box, named after the finding) and a text node, under the volume's study."""
        from radfm3d.slicer.nodes import create_roi_nodes, create_text_node

        rois = create_roi_nodes(slicer.mrmlScene, answer.boxes, answer.text, volume_node)
        text = create_text_node(slicer.mrmlScene, answer.text, f"RadFM3D answer ({volume_node.GetName()})",
                                volume_node)
        return rois, text


# ------------------------------------------------------------------------------------------------ widget
class RadFM3DWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        self.logic = RadFM3DLogic()
        self.worker = None
        self.cancel = None
        self.events = queue.Queue()
        settings = qt.QSettings()

        box = ctk.ctkCollapsibleButton()
        box.text = "Ask"
        self.layout.addWidget(box)
        form = qt.QFormLayout(box)

        self.volumeSelector = slicer.qMRMLNodeComboBox()
        self.volumeSelector.nodeTypes = ["vtkMRMLScalarVolumeNode"]
        self.volumeSelector.noneEnabled = False
        self.volumeSelector.addEnabled = False
        self.volumeSelector.removeEnabled = False
        self.volumeSelector.setMRMLScene(slicer.mrmlScene)
        form.addRow("Input volume:", self.volumeSelector)

        self.taskCombo = qt.QComboBox()
        self.taskCombo.addItems(list(TASKS))
        self.taskCombo.currentTextChanged.connect(lambda t: self.promptEdit.setPlainText(TASKS.get(t, "")))
        form.addRow("Task:", self.taskCombo)
        self.promptEdit = qt.QPlainTextEdit(TASKS["Report"])
        self.promptEdit.setMaximumHeight(70)
        form.addRow("Prompt:", self.promptEdit)
        self.maxTokens = qt.QSpinBox()
        self.maxTokens.setRange(1, 1024)
        self.maxTokens.value = 256
        form.addRow("Max tokens:", self.maxTokens)

        buttons = qt.QHBoxLayout()
        self.runButton = qt.QPushButton("Run")
        self.cancelButton = qt.QPushButton("Cancel")
        self.cancelButton.enabled = False
        buttons.addWidget(self.runButton)
        buttons.addWidget(self.cancelButton)
        form.addRow(buttons)
        self.answerView = qt.QTextBrowser()
        form.addRow("Answer:", self.answerView)
        self.statusLabel = qt.QLabel("")
        form.addRow(self.statusLabel)

        conn = ctk.ctkCollapsibleButton()
        conn.text = "Model"
        self.layout.addWidget(conn)
        cform = qt.QFormLayout(conn)
        self.localRadio = qt.QRadioButton("Local (model in Slicer)")
        self.remoteRadio = qt.QRadioButton("Remote (radfm3d serve)")
        modes = qt.QHBoxLayout()
        modes.addWidget(self.localRadio)
        modes.addWidget(self.remoteRadio)
        cform.addRow("Mode:", modes)
        remote = settings.value(SETTINGS + "mode", "Remote") == "Remote"
        (self.remoteRadio if remote else self.localRadio).checked = True
        self.sourceEdit = qt.QLineEdit(settings.value(SETTINGS + "source", ""))
        self.sourceEdit.placeholderText = "radfm3d source folder (optional if radfm3d is installed)"
        cform.addRow("radfm3d folder:", self.sourceEdit)
        self.modelEdit = qt.QLineEdit(settings.value(SETTINGS + "model", ""))
        self.modelEdit.placeholderText = "model folder, e.g. .../bundles/radfm3d_demo/models/model"
        cform.addRow("Local model:", self.modelEdit)
        self.urlEdit = qt.QLineEdit(settings.value(SETTINGS + "url", "http://127.0.0.1:8000"))
        cform.addRow("Server URL:", self.urlEdit)
        self.keyEdit = qt.QLineEdit(os.environ.get("RADFM3D_API_KEY", ""))
        self.keyEdit.echoMode = qt.QLineEdit.Password
        cform.addRow("API key:", self.keyEdit)
        self.testButton = qt.QPushButton("Test connection")
        cform.addRow(self.testButton)
        self.layout.addStretch(1)

        self.runButton.clicked.connect(self.onRun)
        self.cancelButton.clicked.connect(self.onCancel)
        self.testButton.clicked.connect(self.onTestConnection)
        self.timer = qt.QTimer()
        self.timer.setInterval(100)
        self.timer.timeout.connect(self.onPoll)

    def cleanup(self):
        self.onCancel()
        self.timer.stop()

    @property
    def mode(self):
        return "Local" if self.localRadio.checked else "Remote"

    def _save_settings(self):
        settings = qt.QSettings()
        settings.setValue(SETTINGS + "mode", self.mode)
        settings.setValue(SETTINGS + "source", self.sourceEdit.text)
        settings.setValue(SETTINGS + "model", self.modelEdit.text)
        settings.setValue(SETTINGS + "url", self.urlEdit.text)

    def onTestConnection(self):
        try:
            _ensure_radfm3d(self.sourceEdit.text.strip())
            from radfm3d.client import RadFM3DClient

            message = RadFM3DClient(self.urlEdit.text.strip(), api_key=self.keyEdit.text or None,
                                    timeout=10).test_connection()
        except Exception as err:  # noqa: BLE001 - shown to the user
            message = f"Connection failed: {err}"
        self.statusLabel.text = message

    def onRun(self):
        volume = self.volumeSelector.currentNode()
        if volume is None or self.worker is not None:
            return
        self._save_settings()
        if self.mode == "Local" and not self.modelEdit.text.strip():
            slicer.util.errorDisplay("Local mode: set 'Local model' to a radfm3d model folder")
            return
        try:
            _ensure_radfm3d(self.sourceEdit.text.strip(), need_torch=self.mode == "Local")
        except Exception as err:  # noqa: BLE001 - shown to the user
            slicer.util.errorDisplay(str(err))
            return
        self.answerView.clear()
        self.statusLabel.text = "Loading the model (first run) ..." if (
            self.mode == "Local" and self.logic.runner is None) else "Running ..."
        self.cancel = threading.Event()
        args = dict(volume=self.logic.read_volume(volume), prompt=self.promptEdit.toPlainText(), mode=self.mode,
                    model=self.modelEdit.text.strip(), url=self.urlEdit.text.strip(), api_key=self.keyEdit.text,
                    max_tokens=int(self.maxTokens.value), cancel=self.cancel)
        # the volume was read above on the GUI thread; the worker only runs the model, the GUI polls its events
        self.worker = threading.Thread(target=self._work, args=(args, volume), daemon=True)
        self.runButton.enabled, self.cancelButton.enabled = False, True
        self.started = time.time()
        self.worker.start()
        self.timer.start()

    def _work(self, args, volume):
        try:
            answer = self.logic.ask(on_delta=lambda piece: self.events.put(("delta", piece)), **args)
            self.events.put(("done", (volume, answer)))
        except Exception as err:  # noqa: BLE001 - reported in the panel, details in the log
            traceback.print_exc()
            self.events.put(("error", str(err)))

    def onCancel(self):
        if self.cancel is not None:
            self.cancel.set()
            self.statusLabel.text = "Cancelling ..."

    def onPoll(self):
        while True:
            try:
                kind, value = self.events.get_nowait()
            except queue.Empty:
                return
            if kind == "delta":
                self.answerView.insertPlainText(value)
                continue
            self.timer.stop()
            self.worker, self.runButton.enabled, self.cancelButton.enabled = None, True, False
            if kind == "error":
                self.statusLabel.text = f"Failed: {value}"
                return
            volume, answer = value
            self.answerView.setPlainText(answer.text)
            if answer.finish_reason == "cancelled":
                self.statusLabel.text = "Cancelled."
                return
            rois, _ = self.logic.show_results(volume, answer)
            self.statusLabel.text = (f"Done in {time.time() - self.started:.1f} s: {len(rois)} box(es) added as ROI "
                                     "nodes.")
            return


# ------------------------------------------------------------------------------------------------ test
class RadFM3DTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test of the node <-> model geometry (no model needed)."""

    def runTest(self):
        import numpy as np

        slicer.mrmlScene.Clear(0)
        from radfm3d.slicer.geometry import roi_parameters
        from radfm3d.slicer.nodes import create_roi_nodes, volume_model_input

        node = slicer.util.addVolumeFromArray(np.zeros((10, 12, 14), dtype=np.int16), name="zeros")
        array, affine = volume_model_input(node)
        assert array.shape == (14, 12, 10)
        corners = [[x, y, z] for x in (0.0, 4.0) for y in (0.0, 6.0) for z in (0.0, 2.0)]
        box = {"corners_world_mm": corners, "axes_world": np.eye(3).tolist()}
        [roi] = create_roi_nodes(slicer.mrmlScene, [box], "lesion <box>1,1,1,2,2,2</box>", node)
        assert np.allclose(roi.GetSize(), roi_parameters(box)["size"])
        self.delayDisplay("RadFM3D geometry self-test passed")
