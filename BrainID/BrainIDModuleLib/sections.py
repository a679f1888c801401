"""The "Anatomical correspondence" and "Few-shot segmentation" sections of BrainID.ui: their buttons
start jobs through the Panel (one job at a time, Cancel on the button that started it); the work
is in CorrespondenceLogic and FewShotLogic, passed in."""

from __future__ import annotations

import qt
import slicer

from BrainIDModuleLib import views

HEAD_FILTER = "BrainID few-shot head (*.safetensors)"


class CorrespondenceSection:
    def __init__(self, panel, logic):
        self.panel, self.ui, self.logic = panel, panel.ui, logic

    def setup(self):
        self.ui.pointSelector.connect("currentNodeChanged(vtkMRMLNode*)", self.onPointNodeChanged)
        self.ui.heatmapCheckBox.connect("toggled(bool)", self.onHeatmapToggled)
        self.ui.findMatchButton.connect("clicked(bool)", self.onFindMatch)

    def updateButtons(self, running, jobButton):
        p, button = self.panel.params, self.ui.findMatchButton
        ready = p is not None and p.inputVolume is not None and p.points is not None
        button.text = "Cancel" if running and button is jobButton else "Find match"
        button.enabled = (running and button is jobButton) or (not running and ready)

    def onPointNodeChanged(self, node=None):
        self.ui.pointPlaceWidget.setCurrentNode(self.ui.pointSelector.currentNode())

    def onFindMatch(self):
        p = self.panel.params
        self.panel.run(self.ui.findMatchButton, lambda: self.logic.startCorrespondence(
            p.inputVolume, p.points, self.ui.targetVolumesSelector.checkedNodes(), **self.panel.engineOptions()),
            lambda results: self.onHeatmapToggled())

    def onHeatmapToggled(self, checked=None):
        """The heatmap over the first searched volume other than the input (else the input), or none."""
        matches = [m for m in self.logic.lastMatches if m["heatmap"].GetScene()]
        if not self.ui.heatmapCheckBox.checked:
            views.hide_foreground()
        elif matches:
            m = next((m for m in matches if m["volume"] is not self.panel.params.inputVolume), matches[0])
            views.show_heatmap(m["volume"], m["heatmap"], m["point_ras"])


class FewShotSection:
    def __init__(self, panel, logic):
        self.panel, self.ui, self.logic = panel, panel.ui, logic

    def setup(self):
        self.ui.fewShotSegmentationsSelector.connect("checkedNodesChanged()", self.panel.updateButtons)
        self.ui.trainHeadButton.connect("clicked(bool)", self.onTrainHead)
        self.ui.saveHeadButton.connect("clicked(bool)", self.onSaveHead)
        self.ui.loadHeadButton.connect("clicked(bool)", self.onLoadHead)
        self.ui.applyHeadButton.connect("clicked(bool)", self.onApplyHead)

    def updateButtons(self, running, jobButton):
        ui, head, p = self.ui, self.logic.fewShotHead, self.panel.params
        has_input = p is not None and p.inputVolume is not None
        for button, ready, idle_text in (
                (ui.trainHeadButton, bool(ui.fewShotSegmentationsSelector.checkedNodes()), "Train"),
                (ui.applyHeadButton, has_input and head is not None, "Segment input volume")):
            button.text = "Cancel" if running and button is jobButton else idle_text
            button.enabled = (running and button is jobButton) or (not running and ready)
        ui.saveHeadButton.enabled = not running and head is not None
        ui.loadHeadButton.enabled = not running
        ui.headLabel.text = "none" if head is None else (head.summary() if hasattr(head, "summary") else head.name)

    def onTrainHead(self):
        from BrainIDLib import slicer_adapter as sa

        p = self.panel.params
        segs = self.ui.fewShotSegmentationsSelector.checkedNodes()
        volumes = [sa.reference_volume_of(s) or p.inputVolume for s in segs]
        self.panel.run(self.ui.trainHeadButton, lambda: self.logic.startFewShotTrain(
            segs, volumes, name=p.headName.strip() or "few-shot", **self.panel.engineOptions()))

    def onApplyHead(self):
        self.panel.run(self.ui.applyHeadButton, lambda: self.logic.startFewShotApply(
            self.panel.params.inputVolume, **self.panel.engineOptions()))

    def onSaveHead(self):
        head = self.logic.fewShotHead
        path = qt.QFileDialog.getSaveFileName(None, "Save few-shot head", f"{head.name}.safetensors", HEAD_FILTER)
        if path:
            with slicer.util.tryWithErrorDisplay("Could not save the head.", waitCursor=True):
                self.ui.statusLabel.text = f"Head saved to {self.logic.saveHead(head, path)}"

    def onLoadHead(self):
        path = qt.QFileDialog.getOpenFileName(None, "Load few-shot head", "", HEAD_FILTER)
        if path:
            with slicer.util.tryWithErrorDisplay("Could not load the head.", waitCursor=True):
                self.panel.params.headName = self.logic.loadHead(path).name
        self.panel.updateButtons()
