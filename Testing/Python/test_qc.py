"""QC: per-structure and whole-scan scores, the uncertainty map, their files (volumes CSV columns,
_qc.json, _uncertainty.nii.gz) and the HTML report.

The scoring machinery is checked with hand-made networks whose answers are known (a perfectly
left/right-aware one agrees with itself under every perturbation; one that calls everything "left"
fails the mirror test); the shipped model is used only for ranges, determinism and the files,
never for exact numbers (the weights may be retrained)."""

from __future__ import annotations

import csv
import json
import math
import re
import struct
import zlib

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainIDLib import cli, qc
from BrainIDLib.labels import SEGMENTATION_LABELS, label_color
from BrainIDLib.report import montage, png_bytes
from BrainIDLib.samples import sample_path

LABELS = list(SEGMENTATION_LABELS)
LEFT_WM, RIGHT_WM = LABELS.index(2), LABELS.index(41)


def blobs() -> torch.Tensor:
    """(1, 1, 16, 16, 16) binary input: one cube in each hemisphere (RAS axis 0), away from the midline."""
    x = torch.zeros(1, 1, 16, 16, 16)
    x[0, 0, 2:6, 5:11, 5:11] = 1
    x[0, 0, 10:14, 5:11, 5:11] = 1
    return x


def one_hot(idx: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.one_hot(idx, len(LABELS)).permute(3, 0, 1, 2).float()


def hemisphere_net(x: torch.Tensor) -> torch.Tensor:
    """Bright voxels are white matter of the hemisphere they lie in: a network that knows left from right."""
    inside = x[0, 0] > 0.5
    left = torch.zeros_like(inside)
    left[:8] = True
    idx = torch.zeros(inside.shape, dtype=torch.long)
    idx[inside & left] = LEFT_WM
    idx[inside & ~left] = RIGHT_WM
    return one_hot(idx)


def all_left_net(x: torch.Tensor) -> torch.Tensor:
    """Every bright voxel is left white matter: mirroring the input exposes it."""
    idx = torch.where(x[0, 0] > 0.5, LEFT_WM, 0)
    return one_hot(idx)


def test_mirror_index_swaps_left_and_right():
    m = qc.mirror_index(LABELS)
    assert m[LEFT_WM] == RIGHT_WM and m[RIGHT_WM] == LEFT_WM
    assert m[LABELS.index(16)] == LABELS.index(16)  # brainstem has no partner
    assert torch.equal(m[m], torch.arange(len(LABELS)))


@pytest.mark.parametrize("kind", qc.KNOWN_PERTURBATIONS)
def test_restore_undoes_each_perturbation(kind):
    x = blobs()
    back = qc.restore(hemisphere_net(qc.perturb(x, kind)), kind, qc.mirror_index(LABELS))
    assert torch.equal(back, hemisphere_net(x))


def test_consistent_network_scores_one_and_is_certain():
    x = blobs()
    report, unc = qc.assess(x, hemisphere_net(x), hemisphere_net, LABELS, voxel_ml=1.0, kinds=("flip", "shift"))
    s = report.by_label()
    assert s[2].agreement == 1.0 and s[41].agreement == 1.0
    assert s[2].by_perturbation == {"flip": 1.0, "shift": 1.0}
    assert s[2].confidence == 1.0 and s[2].score == pytest.approx(s[2].volume_plausibility)  # both estimates 1
    assert s[2].expected_dice == pytest.approx(1.0)
    assert s[2].volume_ml == pytest.approx(4 * 6 * 6)
    assert float(unc.max()) == pytest.approx(0.0, abs=1e-6)
    assert unc.shape == x.shape[2:]


def test_left_right_confusion_is_caught_by_the_mirror_pass():
    x = blobs()
    report, unc = qc.assess(x, all_left_net(x), all_left_net, LABELS, voxel_ml=1.0, kinds=("flip", "shift"))
    s = report.by_label()[2]
    assert s.by_perturbation == {"flip": 0.0, "shift": 1.0}
    assert s.agreement == pytest.approx(1 / 2) and s.confidence == pytest.approx(2 / 3)
    assert float(unc[x[0, 0] > 0.5].min()) > 0.1  # mean of one-hot left and right: uncertain


def test_probability_left_outside_the_structure_lowers_expected_dice_not_confidence():
    """Left WM labelled with certainty where it is, plus a rival 40% of left-WM probability on a slab
    of background (still labelled background): confidence inside stays 1, the soft Dice falls to
    2|S| / (|S| + |S| + 0.4 |slab|)."""
    x = blobs()

    def leaky_net(inp):
        p = hemisphere_net(inp)
        p[:, :, 12:16, 12:16] = 0
        p[LEFT_WM, :, 12:16, 12:16] = 0.4
        p[0, :, 12:16, 12:16] = 0.6
        return p

    report, _ = qc.assess(x, leaky_net(x), leaky_net, LABELS, voxel_ml=1.0, kinds=("shift",))
    s = report.by_label()[2]
    size, slab = 4 * 6 * 6, 16 * 4 * 4
    restored = qc.restore(leaky_net(qc.perturb(x, "shift")), "shift", qc.mirror_index(LABELS))
    mass = float((leaky_net(x)[LEFT_WM] + restored[LEFT_WM]).sum()) / 2
    assert s.confidence == pytest.approx(1.0)
    assert mass == pytest.approx(size + 0.4 * slab)
    assert s.expected_dice == pytest.approx(2 * size / (size + mass))
    assert s.expected_dice < 0.8


def test_default_passes_and_unknown_ones():
    x = blobs()
    report, _ = qc.assess(x, all_left_net(x), all_left_net, LABELS, voxel_ml=1.0)
    assert report.perturbations == qc.PERTURBATIONS and set(report.structures[0].by_perturbation) == set(qc.PERTURBATIONS)
    assert qc.check_perturbations(True) == qc.PERTURBATIONS and qc.check_perturbations("shift") == ("shift",)
    import BrainIDLib
    from BrainIDLib.errors import BrainIDError

    with pytest.raises(BrainIDError, match="unknown QC perturbation 'gamma'"):
        BrainIDLib.predict("no-such-file.nii.gz", model="brainid-lite", qc=("flip", "gamma"))  # before any work


def test_keep_mask_and_crop():
    x = blobs()
    keep = torch.ones(12, 12, 12, dtype=torch.bool)
    keep[:, :, :6] = False
    report, unc = qc.assess(x, hemisphere_net(x), hemisphere_net, LABELS, voxel_ml=1.0,
                            crop=lambda t: t[..., 2:14, 2:14, 2:14], keep=keep)
    assert unc.shape == (12, 12, 12) and float(unc[~keep].abs().max()) == 0.0
    assert report.by_label()[2].volume_ml == 4 * 6 * 3  # only the kept half of the cube counts


def test_volume_plausibility():
    assert qc.plausibility(10.0, 5.0, 20.0) == 1.0
    assert qc.plausibility(0.0, 5.0, 20.0) == pytest.approx(0.0, abs=1e-6)  # normally present, missing
    far = [qc.plausibility(v, 5.0, 20.0) for v in (30.0, 60.0, 120.0, 400.0)]
    assert far == sorted(far, reverse=True) and far[-1] < 0.01
    assert qc.plausibility(3.0, 0.0, 0.0) == 1.0  # never seen in training maps: no opinion
    norms = qc.volume_norms()
    assert {int(k) for k in norms["structures"]} == set(LABELS) - {0}
    assert 1000 < norms["total"]["median_ml"] < 2500


def test_typical_dice_prior_sets_the_level_the_scan_moves_it():
    # the model's record on a structure and the scan's own estimate, combined as a geometric mean
    assert qc.structure_score(0.8, 0.6, 1.0, None) == pytest.approx(0.7)
    assert qc.structure_score(0.8, 0.6, 0.5, 0.28) == pytest.approx(math.sqrt(0.28 * 0.7) * 0.5)
    x = blobs()
    plain, _ = qc.assess(x, hemisphere_net(x), hemisphere_net, LABELS, voxel_ml=1.0)
    known, _ = qc.assess(x, hemisphere_net(x), hemisphere_net, LABELS, voxel_ml=1.0, typical_dice={2: 0.36})
    p, k = plain.by_label(), known.by_label()
    assert p[2].typical_dice is None and k[2].typical_dice == 0.36 and k[41].typical_dice is None
    assert k[2].score == pytest.approx(0.6 * p[2].score)  # sqrt(0.36 x 1) x plausibility
    assert k[41].score == p[41].score
    assert k[2].flagged and not p[2].flagged
    assert known.scan_score == plain.scan_score  # the whole-scan score compares scans: no model constant in it
    written = {r["label"]: r for r in json.loads(json.dumps(known.to_dict()))["structures"]}
    assert written[2]["typical_dice"] == 0.36 and written[41]["typical_dice"] is None


def test_typical_dice_is_read_from_the_model_file_and_checked():
    class Model:
        metadata = {"heads": {"segmentation": {"typical_dice": {"2": 0.8, "41": 1.7}}}}

    assert qc.typical_dice_of(Model()) == {2: 0.8, 41: 1.0}  # clipped into [0, 1]
    Model.metadata = {"heads": {"segmentation": {"labels": [0, 2]}}}
    assert qc.typical_dice_of(Model()) is None  # other models: the scan's signals alone
    Model.metadata = {"heads": {"segmentation": {"typical_dice": {"left WM": "high"}}}}
    with pytest.raises(qc.BrainIDError, match="typical_dice"):
        qc.typical_dice_of(Model())


def test_qc_calibration_does_not_reuse_draws_of_another_model(tmp_path, benchmark_module):
    """benchmarks/qc_calibration.py caches its draws; a cache left by other weights, heads or QC
    table must not be calibrated as if it were this model's (it once was, silently)."""
    from BrainIDLib.model import Architecture, BrainIDModel

    C = benchmark_module("qc_calibration")
    torch.manual_seed(0)
    model = BrainIDModel(Architecture(f_maps=4, levels=2, num_groups=2), {"segmentation": 3})
    key = C.model_id(model)
    cache, kinds, said = tmp_path / "cache.json", ("flip",), []
    cache.write_text(json.dumps({"perturbations": list(kinds), "model": key, "rows": [{"map": "a"}], "scans": [{"map": "a"}]}))
    assert C.load_cache(cache, kinds, key, said.append)["rows"] == [{"map": "a"}]  # the same model resumes
    assert said == []
    weight = next(model.heads["segmentation"].parameters())
    with torch.no_grad():
        weight.add_(0.1)  # a refitted head
        assert C.model_id(model) != key
        weight.sub_(0.1)
    model.metadata = {"heads": {"segmentation": {"typical_dice": {"2": 0.8}}}}  # a new QC table
    assert C.model_id(model) != key
    fresh = C.load_cache(cache, kinds, C.model_id(model), said.append)
    assert fresh["rows"] == [] and fresh["model"] == C.model_id(model) and "another model" in said[0]
    assert C.load_cache(cache, ("flip", "shift"), key, said.append)["rows"] == []  # other QC passes


@pytest.fixture(scope="module")
def sample_runs():
    """Two QC runs of the shipped model on the shipped sample (determinism), plus a noise volume."""
    import BrainIDLib

    model = BrainIDLib.load_model("brainid-lite")
    a = BrainIDLib.predict(str(sample_path()), model=model, device="cpu", qc=True)
    b = BrainIDLib.predict(str(sample_path()), model=model, device="cpu", qc=True)
    img = nib.load(str(sample_path()))
    noise = np.random.default_rng(0).random(img.shape).astype(np.float32) * 100
    n = BrainIDLib.predict(nib.Nifti1Image(noise, img.affine), model=model, device="cpu", qc=True)
    return a, b, n, img


@pytest.mark.slow
def test_qc_on_the_sample_ranges_and_determinism(sample_runs):
    a, b, _, img = sample_runs
    assert a.qc.to_dict() == b.qc.to_dict()
    ua, ub = np.asanyarray(a.uncertainty.dataobj), np.asanyarray(b.uncertainty.dataobj)
    np.testing.assert_array_equal(ua, ub)
    assert ua.shape == img.shape and np.allclose(a.uncertainty.affine, img.affine)
    assert ua.min() >= 0 and ua.max() <= 1 and ua.max() > 0.05
    pad = np.asanyarray(img.dataobj) <= np.asanyarray(img.dataobj).min()
    assert float(ua[pad].max()) == 0.0  # the empty padding is certain background, as in the segmentation
    assert float(ua[~pad].mean()) > 0.01
    assert [s.label for s in a.qc.structures] == [v for v in LABELS if v]
    for s in a.qc.structures:
        for v in (s.score, s.agreement, s.volume_plausibility, s.confidence, s.expected_dice):
            assert 0.0 <= v <= 1.0 and not math.isnan(v), s
        assert s.flagged == (s.score < a.qc.threshold)
        assert s.score == pytest.approx(qc.structure_score(s.agreement, s.expected_dice, s.volume_plausibility, s.typical_dice))
    assert 0.0 <= a.qc.scan_score <= 1.0
    seg = np.asanyarray(a.outputs["segmentation"].dataobj)
    brain_ml = (seg > 0).sum() * np.prod(img.header.get_zooms()) / 1000
    assert a.qc.total_volume_ml == pytest.approx(brain_ml, rel=0.1)  # model grid vs input grid


@pytest.mark.slow
def test_noise_scores_below_a_brain(sample_runs):
    a, _, n, _ = sample_runs
    assert n.qc.scan_score < a.qc.scan_score - 0.2


def test_no_qc_without_segmentation():
    import BrainIDLib

    img = nib.load(str(sample_path()))
    small = nib.Nifti1Image(np.asanyarray(img.dataobj)[::3, ::3, ::3].astype(np.float32), img.affine @ np.diag([3, 3, 3, 1]))
    pred = BrainIDLib.predict(small, tasks=("anatomy",), model="brainid-lite", device="cpu", qc=True)
    assert pred.qc is None and pred.uncertainty is None


def test_report_shows_absent_structures_as_absent_not_as_a_green_score():
    from types import SimpleNamespace

    from BrainIDLib.report import render_html

    x = blobs()
    report, unc = qc.assess(x, hemisphere_net(x), hemisphere_net, LABELS, voxel_ml=1.0)
    seg = nib.Nifti1Image(np.asarray(LABELS)[hemisphere_net(x).argmax(0).numpy()].astype(np.int16), np.eye(4))
    pred = SimpleNamespace(outputs={"segmentation": seg}, qc=report, uncertainty=None, device="cpu")
    page = render_html(nib.Nifti1Image(x[0, 0].numpy(), np.eye(4)), "blobs", pred, "toy", labels=LABELS)
    row = lambda name: re.search(rf"<tr><td>\d+</td><td>{name}</td>.*?</tr>", page).group(0)
    wm_hypo, hippocampus = report.by_label()[77], report.by_label()[17]
    assert wm_hypo.volume_ml == 0 and not wm_hypo.flagged and wm_hypo.score == 1.0  # absence is normal for it
    assert wm_hypo.absent and not hippocampus.absent and not report.by_label()[2].absent
    # the optic chiasm too: training maps hold it down to 0.001 mL
    assert {s["name"] for s in report.to_dict()["structures"] if s["absent"]} == {"WM-hypointensities", "Optic-Chiasm"}
    assert "<td title='not labelled; normal scans may have none'>absent</td>" in row("WM-hypointensities")
    assert hippocampus.volume_ml == 0 and hippocampus.flagged  # a structure every brain has, missing
    assert f"<td class='low'>{hippocampus.score:.2f}</td>" in row("Left-Hippocampus")
    assert "<td class='good'>1.00</td>" in row("Left-Cerebral-White-Matter")


# ------------------------------------------------------------------------------ files
def run_cli(capsys, *argv):
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def decode_png(data: bytes) -> np.ndarray:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos : pos + 8])
        body = data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(kind + body)
        chunks[kind] = chunks.get(kind, b"") + body
        pos += 12 + n
    w, h = struct.unpack(">II", chunks[b"IHDR"][:8])
    raw = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + 3 * w)
    assert (raw[:, 0] == 0).all()
    return raw[:, 1:].reshape(h, w, 3)


def test_png_encoder_roundtrip():
    rgb = np.random.default_rng(0).integers(0, 256, (7, 11, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decode_png(png_bytes(rgb)), rgb)


def test_montage_shows_three_planes_with_overlay():
    img = nib.load(str(sample_path()))
    data = np.asanyarray(img.dataobj)
    seg = nib.Nifti1Image((data > np.percentile(data, 80)).astype(np.int16) * 17, img.affine)
    plain, over = montage(img), montage(img, seg)
    assert plain.shape == over.shape and plain.dtype == np.uint8 and plain.shape[2] == 3
    assert plain.shape[1] > 2 * plain.shape[0]  # three planes side by side
    colour = np.array(label_color(17))
    tinted = np.abs(over.astype(int) - plain.astype(int)).sum(-1) > 0
    assert tinted.mean() > 0.01  # the overlay is visible ...
    before = np.abs(plain[tinted].astype(int) - colour).sum(-1).mean()
    after = np.abs(over[tinted].astype(int) - colour).sum(-1).mean()
    assert after < 0.7 * before  # ... and tinted towards the structure's colour


@pytest.mark.slow
def test_cli_writes_qc_uncertainty_and_report(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "predict", "--sample", "--task", "segmentation", "-o", f"{tmp_path}/",
                           "--uncertainty", "--report", "--device", "cpu", "--progress-format", "machine")
    assert rc == 0, err
    stem = tmp_path / "MNI152-brain-1.5mm"
    outputs = {line.split()[1] for line in out.splitlines() if line.startswith("OUTPUT ")}
    assert outputs == {"segmentation", "uncertainty", "volumes", "qc", "report"}
    with open(f"{stem}_volumes.csv") as f:
        rows = list(csv.DictReader(f))
    doc = json.loads(open(f"{stem}_qc.json").read())
    by_name = {s["name"]: s for s in doc["structures"]}
    for r in rows:
        score = float(r["qc_score"])
        assert 0 <= score <= 1 and r["qc_flagged"] in ("0", "1")
        assert score == pytest.approx(by_name[r["name"]]["score"], abs=1e-3)
        assert (r["qc_flagged"] == "1") == (r["name"] in doc["flagged"])
    assert 0 <= doc["scan_score"] <= 1 and doc["perturbations"] == list(qc.PERTURBATIONS)
    unc = nib.load(f"{stem}_uncertainty.nii.gz")
    assert unc.shape == nib.load(str(sample_path())).shape
    page = open(f"{stem}_report.html", encoding="utf-8").read()
    assert len(page.encode()) < 3 << 20
    assert not re.search(r"(src|href)=['\"](https?:|//|file:)", page)  # offline: nothing outside the file
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == 3  # input, segmentation overlay, uncertainty
    for b64 in images:
        import base64

        assert decode_png(base64.b64decode(b64)).shape[1] > 300
    assert "whole-scan QC" in page and "Left-Cerebral-White-Matter" in page
    assert "QC: whole-scan score" in out


def test_qc_options_need_segmentation(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "predict", "--sample", "--task", "anatomy", "--qc", "-o", f"{tmp_path}/")
    assert rc == 2 and "--qc need the segmentation task" in err and "Traceback" not in err
    rc, out, err = run_cli(capsys, "predict", "--sample", "--uncertainty", "--no-qc", "-o", f"{tmp_path}/")
    assert rc == 2 and "drop --no-qc" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.slow
def test_no_qc_keeps_the_plain_volumes_table(tmp_path, capsys):
    rc, out, err = run_cli(capsys, "predict", "--sample", "--task", "segmentation", "--no-qc", "-o", f"{tmp_path}/",
                           "--progress-format", "none")
    assert rc == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["MNI152-brain-1.5mm_segmentation.nii.gz",
                                                         "MNI152-brain-1.5mm_volumes.csv"]
    header = open(tmp_path / "MNI152-brain-1.5mm_volumes.csv").readline().strip()
    assert header == "label,name,voxels,volume_ml"
