"""QC in Slicer (slicer-core, real MRML): the volumes table's QC and Trust columns, the uncertainty
map as a heat-coloured volume on the input's geometry, the summary line naming flagged structures,
and the child-process command asking for QC (or not)."""

from __future__ import annotations


import numpy as np
import pytest

from slicer_helpers import require_slicer

slicer = require_slicer()

from BrainIDModuleLib.jobs import JobLauncher  # noqa: E402
from BrainIDModuleLib.predict_logic import PredictLogic  # noqa: E402

from BrainIDLib import qc as Q  # noqa: E402
from BrainIDLib import slicer_adapter as sa  # noqa: E402
from BrainIDLib.labels import SEGMENTATION_LABELS  # noqa: E402


@pytest.fixture(autouse=True)
def scene():
    return sa.init_headless_scene()


def fake_engine():
    """A predict() whose QC report says: Left-Hippocampus trustworthy, Left-Amygdala not."""
    import nibabel as nib

    labels = list(SEGMENTATION_LABELS)
    n = len(labels)
    agree = [1.0] * n
    agree[labels.index(18)] = 0.2
    volume = [0.0] * n
    volume[labels.index(17)], volume[labels.index(18)] = 3.5, 1.5
    expected = [0.9] * n
    expected[labels.index(18)] = 0.5
    report = Q.score(labels, {"flip": agree, "shift": agree}, volume, [0.9] * n, expected)

    class Prediction:
        def __init__(self, image):
            lab = np.zeros(image.shape, np.int16)
            lab[1:4, 1:4, 1:4], lab[5:7, 5:7, 5:7] = 17, 18
            self.outputs = {"segmentation": nib.Nifti1Image(lab, image.affine)}
            self.qc, self.messages = report, []
            self.uncertainty = nib.Nifti1Image(np.linspace(0, 1, lab.size, dtype=np.float32).reshape(lab.shape),
                                               image.affine)

    calls = {}

    def predict(image, tasks, **kw):
        calls.update(kw)
        return Prediction(image)

    return predict, calls


def test_volumes_table_qc_columns_uncertainty_and_summary(monkeypatch):
    import BrainIDLib

    node = sa.add_scalar_volume(np.random.default_rng(0).random((8, 9, 10)).astype(np.float32), "scan",
                                affine=np.diag([-1.2, -1.0, 2.0, 1.0]))
    predict, calls = fake_engine()
    monkeypatch.setattr(BrainIDLib, "predict", predict, raising=False)
    log = []
    results = PredictLogic(log=log.append).process(node, tasks=["segmentation"], device="cpu")
    assert calls["qc"] is True
    t = results["volumes"].GetTable()
    columns = [t.GetColumn(i).GetName() for i in range(t.GetNumberOfColumns())]
    assert columns == ["Label", "Structure", "Volume [mL]", "QC", "Trust"]
    rows = {t.GetValue(r, 1).ToString(): (t.GetValue(r, 3).ToDouble(), t.GetValue(r, 4).ToString())
            for r in range(t.GetNumberOfRows())}
    assert rows["Left-Hippocampus"][0] == pytest.approx(0.5 * (1.0 + 0.9)) and rows["Left-Hippocampus"][1].endswith("good")
    assert rows["Left-Amygdala"][0] < Q.FLAG_BELOW and rows["Left-Amygdala"][1].endswith("low")
    assert rows["WM-hypointensities"][1] == sa.ABSENT_MARK  # 0 mL, normal: no green "good"
    assert rows["Right-Hippocampus"][1].endswith("low")  # 0 mL where every brain has one: flagged
    assert sa.table_rows(results["volumes"])[0][:2] == (2, "Left-Cerebral-White-Matter")  # first columns unchanged
    unc = results["uncertainty"]
    np.testing.assert_array_equal(sa.ijk_to_ras(unc), sa.ijk_to_ras(node))
    assert unc.GetName() == "scan QC uncertainty"
    assert sa.array_from_volume(unc)[0].max() == pytest.approx(1.0)
    assert any("whole-scan score" in line and "Left-Amygdala" in line and "Left-Hippocampus" not in line
               for line in log)


def test_child_process_is_asked_for_qc_unless_turned_off(tmp_path):
    class Runner:
        def __init__(self, commands, env=None):
            self.commands = commands

        def start(self):
            return self

    logic = PredictLogic(JobLauncher(Runner, python="python"))
    node = sa.add_scalar_volume(np.ones((4, 4, 4), np.float32), "scan")
    with_qc = logic.start(node, tasks=["segmentation"], workdir=tmp_path / "a").runner.commands[0]
    without = logic.start(node, tasks=["segmentation"], qc=False, workdir=tmp_path / "b").runner.commands[0]
    assert with_qc[:3] == ["python", "-m", "BrainIDModuleLib.engine"] and "--no-qc" not in with_qc
    assert "--no-qc" in without
