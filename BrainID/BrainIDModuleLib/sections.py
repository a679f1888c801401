"""GUI wiring of the "Anatomical correspondence" and "Few-shot segmentation" sections (BrainID.ui).

Kept beside BrainID.py (which stays short): the widget creates `Sections(widget)`, forwards its
parameter-node and button-state updates, and runs the jobs these handlers start with its own
timer, progress bar and log. The work itself is in the logic (correspondence_logic, fewshot_logic).
Parameter node: "CorrespondencePoints" (point list), "CorrespondenceTarget" (several references),
"FewShotSegmentation" (several references), "HeadName", "ShowHeatmap".
"""

from __future__ import annotations

import qt
import slicer

HEAD_FILTER = "BrainID few-shot head (*.safetensors)"


class Sections:
    def __init__(self, widget):
        self.widget = widget
        self.ui = widget.ui
        self.jobButton = None  # the section button that started the running job (it reads "Cancel")

    def setup(self):
        self.ui.pointSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPointNodeChanged)
        self.ui.targetVolumesSelector.connect("checkedNodesChanged()", self.widget.updateParameterNodeFromGUI)
        self.ui.fewShotSegmentationsSelector.connect("checkedNodesChanged()", self.widget.updateParameterNodeFromGUI)
        self.ui.headNameLineEdit.connect("editingFinished()", self.widget.updateParameterNodeFromGUI)
        self.ui.heatmapCheckBox.connect("toggled(bool)", self.onHeatmapToggled)
        self.ui.findMatchButton.connect("clicked(bool)", self.onFindMatch)
        self.ui.trainHeadButton.connect("clicked(bool)", self.onTrainHead)
        self.ui.saveHeadButton.connect("clicked(bool)", self.onSaveHead)
        self.ui.loadHeadButton.connect("clicked(bool)", self.onLoadHead)
        self.ui.applyHeadButton.connect("clicked(bool)", self.onApplyHead)

    # ---------------------------------------------------------------- parameter node <-> GUI
    def updateGUI(self, p):
        self.ui.pointSelector.setCurrentNode(p.GetNodeReference("CorrespondencePoints"))
        self._setChecked(self.ui.targetVolumesSelector, p, "CorrespondenceTarget")
        self._setChecked(self.ui.fewShotSegmentationsSelector, p, "FewShotSegmentation")
        self.ui.headNameLineEdit.text = p.GetParameter("HeadName")
        self.ui.heatmapCheckBox.checked = p.GetParameter("ShowHeatmap") != "false"

    def updateParameterNode(self, p):
        p.SetNodeReferenceID("CorrespondencePoints", self.ui.pointSelector.currentNodeID)
        for role, combo in (("CorrespondenceTarget", self.ui.targetVolumesSelector),
                            ("FewShotSegmentation", self.ui.fewShotSegmentationsSelector)):
            p.RemoveNodeReferenceIDs(role)
            for node in combo.checkedNodes():
                p.AddNodeReferenceID(role, node.GetID())
        p.SetParameter("HeadName", self.ui.headNameLineEdit.text.strip())
        p.SetParameter("ShowHeatmap", "true" if self.ui.heatmapCheckBox.checked else "false")

    @staticmethod
    def _setChecked(combo, p, role):
        ids = {p.GetNthNodeReferenceID(role, i) for i in range(p.GetNumberOfNodeReferences(role))}
        for i in range(combo.nodeCount()):
            node = combo.nodeFromIndex(i)
            combo.setCheckState(node, qt.Qt.Checked if node.GetID() in ids else qt.Qt.Unchecked)

    def updateButtons(self, running):
        ui, head = self.ui, self.widget.logic.fewShotHead
        has_input = ui.inputSelector.currentNode() is not None
        for button, ready, idle_text in (
                (ui.findMatchButton, has_input and ui.pointSelector.currentNode() is not None, "Find match"),
                (ui.trainHeadButton, bool(ui.fewShotSegmentationsSelector.checkedNodes()), "Train"),
                (ui.applyHeadButton, has_input and head is not None, "Segment input volume")):
            mine = running and button is self.jobButton
            button.text = "Cancel" if mine else idle_text
            button.enabled = mine or (not running and ready)
        ui.saveHeadButton.enabled = not running and head is not None
        ui.loadHeadButton.enabled = not running
        ui.headLabel.text = head.summary() if head is not None and hasattr(head, "summary") else (
            getattr(head, "name", "none") if head is not None else "none")
        if not running:
            self.jobButton = None

    # ---------------------------------------------------------------- actions
    def onPointNodeChanged(self, node=None):
        if hasattr(self.ui.pointPlaceWidget, "setCurrentNode"):
            self.ui.pointPlaceWidget.setCurrentNode(self.ui.pointSelector.currentNode())
        self.widget.updateParameterNodeFromGUI()

    def _run(self, button, start):
        """Start a job from a section button, or cancel the running one when it is that button."""
        w = self.widget
        if w.job is not None:
            if button is self.jobButton:
                w.job.cancel()
                w.appendLog("Cancelled.")
            return
        if not w.ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay("BrainID could not start.", waitCursor=True):
            w.job = start()
            self.jobButton = button
            w.startPolling()

    def _engine_options(self):
        from BrainID import DEVICES

        return {"model": self.widget.selectedModel() or None,
                "device": DEVICES.get(self.ui.deviceComboBox.currentText, "auto")}

    def onFindMatch(self):
        ui = self.ui
        self._run(ui.findMatchButton, lambda: self.widget.logic.startCorrespondence(
            ui.inputSelector.currentNode(), ui.pointSelector.currentNode(), ui.targetVolumesSelector.checkedNodes(),
            **self._engine_options()))

    def onTrainHead(self):
        from BrainIDLib import slicer_adapter as sa

        segs = self.ui.fewShotSegmentationsSelector.checkedNodes()
        volumes = [sa.reference_volume_of(s) or self.ui.inputSelector.currentNode() for s in segs]
        self._run(self.ui.trainHeadButton, lambda: self.widget.logic.startFewShotTrain(
            segs, volumes, name=self.ui.headNameLineEdit.text.strip() or "few-shot", **self._engine_options()))

    def onApplyHead(self):
        self._run(self.ui.applyHeadButton, lambda: self.widget.logic.startFewShotApply(
            self.ui.inputSelector.currentNode(), **self._engine_options()))

    def onSaveHead(self):
        head = self.widget.logic.fewShotHead
        path = qt.QFileDialog.getSaveFileName(None, "Save few-shot head", f"{getattr(head, 'name', 'head')}.safetensors",
                                              HEAD_FILTER)
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the head.", waitCursor=True):
                saved = self.widget.logic.saveHead(head, path)
                self.ui.statusLabel.text = f"Head saved to {saved}"

    def onLoadHead(self):
        path = qt.QFileDialog.getOpenFileName(None, "Load few-shot head", "", HEAD_FILTER)
        if path:
            with slicer.util.tryWithErrorDisplay("Could not load the head.", waitCursor=True):
                head = self.widget.logic.loadHead(path)
                self.ui.headNameLineEdit.text = getattr(head, "name", "")
                self.widget.updateParameterNodeFromGUI()
        self.widget.updateButtons()

    def onHeatmapToggled(self, checked=None):
        from BrainIDLib import slicer_adapter as sa

        if self.widget._updating:  # the GUI following the parameter node: no view changes
            return
        self.widget.updateParameterNodeFromGUI()
        matches = [m for m in getattr(self.widget.logic, "lastMatches", None) or () if m["heatmap"].GetScene()]
        if not self.ui.heatmapCheckBox.checked:
            sa.hide_foreground()
        elif matches:
            m = next((m for m in matches if m["volume"] is not self.ui.inputSelector.currentNode()), matches[0])
            sa.show_heatmap(m["volume"], m["heatmap"], m["point_ras"])

    def finished(self, results):
        """After a job's results are in the scene."""
        if "match" in results and not self.ui.heatmapCheckBox.checked:
            from BrainIDLib import slicer_adapter as sa

            sa.hide_foreground()
