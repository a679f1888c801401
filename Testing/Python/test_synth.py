"""Behaviour of the synthetic subject generator (BrainIDLib.synth) on small phantom label maps.

The phantom is a head of nested ellipsoids with FreeSurfer labels: left structures at low x
(RAS axis 0), right ones mirrored at high x, a midline brainstem, CSF and two extra-cerebral
layers. No shared data is needed.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from BrainIDLib.labels import LEFT_RIGHT_PAIRS, SEGMENTATION_LABELS
from BrainIDLib.synth import SubjectGenerator, default_table, render_t1, to_segmentation
from BrainIDLib.synth.corruption import LN5_OVER_PI
from BrainIDLib.synth.filters import gaussian_blur

LEFT = {2, 3, 4, 10, 17}
RIGHT = {41, 42, 43, 49, 53}


def phantom(n: int = 64) -> torch.Tensor:
    """(n, n, n) int32 label map; the brain is slightly off-centre and asymmetric so that flips and
    shifts are measurable."""
    z, y, x = torch.meshgrid(*(torch.linspace(-1, 1, n),) * 3, indexing="ij")
    # axis 0 ("z" here) is left(-)/right(+)
    lab = torch.zeros((n, n, n), dtype=torch.int32)

    def ell(cx, cy, cz, rx, ry, rz):
        return ((z - cx) / rx) ** 2 + ((y - cy) / ry) ** 2 + ((x - cz) / rz) ** 2 <= 1

    lab[ell(0, 0, 0, 0.95, 0.95, 0.95)] = 530       # scalp-ish
    lab[ell(0, 0, 0, 0.88, 0.88, 0.88)] = 515       # bone-like
    lab[ell(0, 0, 0, 0.8, 0.82, 0.8)] = 24          # CSF
    for side, (wm, gm, ven, tha, hip) in ((-1, (2, 3, 4, 10, 17)), (1, (41, 42, 43, 49, 53))):
        cx = 0.37 * side
        lab[ell(cx, 0.05, 0, 0.36, 0.7, 0.66)] = gm
        lab[ell(cx, 0.05, 0, 0.27, 0.58, 0.54)] = wm
        lab[ell(cx * 0.6, 0.1 if side < 0 else 0.0, 0.1, 0.08, 0.3, 0.12)] = ven
        lab[ell(cx * 0.5, -0.15, -0.1, 0.1, 0.12, 0.14)] = tha
        lab[ell(cx * 0.9, -0.3, -0.25, 0.08, 0.08, 0.2 if side < 0 else 0.12)] = hip
    lab[ell(0, -0.45, -0.2, 0.1, 0.3, 0.12)] = 16     # brainstem on the midline
    return lab


def r2_by_labels(img: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """Fraction of the image's variance explained by its per-label means."""
    x = img.reshape(-1).double()
    lab = labels.reshape(-1).long()
    if mask is not None:
        keep = mask.reshape(-1)
        x, lab = x[keep], lab[keep]
    _, inv = torch.unique(lab, return_inverse=True)
    sums = torch.zeros(int(inv.max()) + 1, dtype=torch.float64).index_add_(0, inv, x)
    cnt = torch.bincount(inv).double()
    fit = (sums / cnt)[inv]
    return float(1 - ((x - fit) ** 2).sum() / ((x - x.mean()) ** 2).sum().clamp_min(1e-12))


@pytest.fixture(scope="module")
def lab64():
    return phantom(64)


def gen(size=48, **kw):
    return SubjectGenerator(preset=kw.pop("preset", "brainid"), size=(size,) * 3, **kw)


def test_contract_shapes_ranges_finite(lab64):
    draw = gen()(lab64, seed=3)
    n, s = 4, (48, 48, 48)
    assert draw["inputs"].shape == (n, 1, *s) and draw["inputs"].dtype == torch.float32
    assert draw["target_t1"].shape == (1, *s)
    assert draw["segmentation"].shape == s and draw["segmentation"].dtype == torch.int64
    assert draw["labels"].shape == s
    assert draw["bias_field"].shape == (n, 1, *s) and draw["clean"].shape == (n, 1, *s)
    assert draw["severity"].tolist() == [0.0, 0.0, 1.0, 1.0]
    assert float(draw["inputs"].min()) >= 0 and float(draw["inputs"].max()) <= 1
    assert int(draw["segmentation"].min()) >= 0 and int(draw["segmentation"].max()) < len(SEGMENTATION_LABELS)
    # segmentation is the label map mapped to the 33-class order
    seg_ids = torch.tensor(SEGMENTATION_LABELS)[draw["segmentation"]]
    for lab in (2, 3, 41, 42, 16, 24):
        assert torch.equal(seg_ids == lab, draw["labels"] == lab)
    for key in ("inputs", "target_t1", "bias_field", "clean"):
        assert torch.isfinite(draw[key]).all(), key
    assert (draw["bias_field"] > 0).all()


def test_extended_preset_finite_and_options_fire(lab64):
    g = gen(preset="brainid-extended", ct_prob=0.4, flair_prob=0.4, motion_prob=(1.0, 1.0),
            motion_strength=((0.1, 0.2), (0.2, 0.3)), pv_prob=1.0)
    seen = {"ct": False, "flair": False}
    for seed in range(4):
        d = g(lab64, seed=seed)
        for key in ("inputs", "clean", "bias_field", "target_t1"):
            assert torch.isfinite(d[key]).all()
        assert float(d["inputs"].min()) >= 0 and float(d["inputs"].max()) <= 1
        assert (d["params"]["motion"] > 0).all()
        seen["ct"] |= bool(d["params"]["ct"].any())
        seen["flair"] |= bool(d["params"]["flair"].any())
    assert seen["ct"] and seen["flair"]


def test_ct_like_bone_bright_flair_csf_dark(lab64):
    g = gen(ct_prob=1.0, resolution_probs=((1, 0, 0, 0), (1, 0, 0, 0)))
    d = g(lab64, seed=1)
    lab = d["labels"]
    for i in range(4):
        clean = d["clean"][i, 0] / d["bias_field"][i, 0]
        bone = clean[lab == 515].mean()
        brain = clean[(lab == 2) | (lab == 3) | (lab == 41) | (lab == 42)].mean()
        assert bone > 1.5 * brain
    g = gen(flair_prob=1.0, resolution_probs=((1, 0, 0, 0), (1, 0, 0, 0)))
    d = g(lab64, seed=1)
    lab = d["labels"]
    for i in range(4):
        clean = d["clean"][i, 0] / d["bias_field"][i, 0]
        assert clean[(lab == 4) | (lab == 43) | (lab == 24)].mean() < clean[(lab == 3) | (lab == 42)].mean()
        assert clean[(lab == 2) | (lab == 41)].mean() < clean[(lab == 3) | (lab == 42)].mean()


def test_t1_like_and_t2_like_orderings(lab64):
    one_mm = ((1, 0, 0, 0), (1, 0, 0, 0))
    for key, expect_t1 in (("t1_prob", True), ("t2_prob", False)):
        d = gen(resolution_probs=one_mm, **{key: 1.0})(lab64, seed=2)
        lab = d["labels"]
        assert d["params"][key[:2]].all()
        for i in range(4):
            x = d["clean"][i, 0] / d["bias_field"][i, 0]
            wm = float(x[(lab == 2) | (lab == 41)].mean())
            gm = float(x[(lab == 3) | (lab == 42)].mean())
            csf = float(x[(lab == 4) | (lab == 43)].mean())
            assert (wm > gm > csf) if expect_t1 else (csf > gm > wm), (key, wm, gm, csf)


def test_seed_determinism(lab64):
    g = gen()
    a, b, c = g(lab64, seed=11), g(lab64, seed=11), g(lab64, seed=12)
    for key in ("inputs", "target_t1", "segmentation", "labels", "bias_field", "clean", "severity"):
        assert torch.equal(a[key], b[key]), key
    assert not torch.equal(a["inputs"], c["inputs"])
    # the global RNG is neither used nor disturbed
    torch.manual_seed(0)
    r0 = torch.rand(3)
    torch.manual_seed(0)
    g(lab64, seed=5)
    assert torch.equal(torch.rand(3), r0)


def test_samples_share_the_deformed_labels(lab64):
    """Every sample of a draw is explained by the one shared label map; a shifted map explains less."""
    g = gen(noise_std=((0, 0), (0, 0)), bias_std=((0, 0), (0, 0)))
    r2s = []
    for seed in range(3):
        d = g(lab64, seed=seed)
        lab = d["labels"]
        head = lab > 0
        shifted = torch.roll(lab, 3, dims=1)
        for i in range(4):
            x = d["clean"][i, 0] / d["bias_field"][i, 0]
            r = r2_by_labels(x, lab, head)
            r2s.append(r)
            assert r > r2_by_labels(x, shifted, head) + 0.05
    assert np.median(r2s) > 0.8


def test_targets_aligned_with_inputs(lab64):
    # canonical render: exactly the per-label intensities of the deformed labels
    d = gen()(lab64, seed=4)
    assert r2_by_labels(d["target_t1"][0], d["labels"]) > 0.999
    assert torch.allclose(d["target_t1"][0], render_t1(d["labels"]))
    # a real T1 goes through the same warp: labels explain the deformed T1; WM median = 1
    t1 = render_t1(lab64) * 100 + torch.randn(lab64.shape, generator=torch.Generator().manual_seed(0)) * 3
    d = gen()(lab64, t1=t1, seed=4)
    tgt, lab = d["target_t1"][0], d["labels"]
    assert r2_by_labels(tgt, lab) > 0.8
    wm = tgt[(lab == 2) | (lab == 41)]
    assert abs(float(wm.median()) - 1.0) < 0.05
    # inputs (mild, before resolution loss) follow the same labels
    for i in range(2):
        assert r2_by_labels(d["clean"][i, 0], lab, lab > 0) > 0.6


def test_flip_swaps_left_right(lab64):
    still = dict(rotation=0.0, shear=0.0, scale=(1.0, 1.0), nonlin_std_max=0.0)
    a = gen(flip_prob=0.0, **still)(lab64, seed=2)
    b = gen(flip_prob=1.0, **still)(lab64, seed=2)
    assert not bool(a["flipped"]) and bool(b["flipped"])
    swap = torch.arange(600)
    for l, r in LEFT_RIGHT_PAIRS:
        swap[l], swap[r] = r, l
    expected = swap[a["labels"].flip(0)]
    assert (expected == b["labels"]).float().mean() > 0.99
    # anatomically consistent: left labels stay on the low-x side after the mirror + swap
    x = torch.arange(48).view(-1, 1, 1).expand(48, 48, 48).float()
    for d in (a, b):
        lab = d["labels"]
        left = torch.isin(lab, torch.tensor(sorted(LEFT)))
        right = torch.isin(lab, torch.tensor(sorted(RIGHT)))
        assert x[left].mean() < 24 < x[right].mean()
    # the mirror is measurable: the asymmetric hippocampi trade their shapes
    assert int((a["labels"] == 17).sum()) != int((b["labels"] == 17).sum())
    # flip rate ~ 0.5 (not the official slip's 0.69)
    g = gen(size=16)
    rate = np.mean([bool(g(lab64, seed=s)["flipped"]) for s in range(60)])
    assert 0.3 < rate < 0.7


def test_bias_field_ranges_measured(lab64):
    g = gen()
    mild, severe = [], []
    for seed in range(4):
        d = g(lab64, seed=seed)
        logb = torch.log(d["bias_field"][:, 0]).flatten(1)
        stds = logb.std(dim=1)
        p = d["params"]
        assert (p["bias_std"][:2] <= 0.02).all() and (p["bias_std"][2:] >= 0.1).all() and (p["bias_std"][2:] <= 0.6).all()
        assert (p["bias_scale"][:2] >= 0.01).all() and (p["bias_scale"][:2] <= 0.02).all()
        assert (p["bias_scale"][2:] >= 0.02).all() and (p["bias_scale"][2:] <= 0.04).all()
        # measured log-std never exceeds the drawn std by much (interpolation only smooths)
        assert (stds <= p["bias_std"] * 1.6 + 1e-4).all()
        mild += stds[:2].tolist()
        severe += stds[2:].tolist()
    assert max(mild) < 0.03
    assert np.mean(severe) > 0.04 and max(severe) < 0.9
    assert np.mean(severe) > 5 * np.mean(mild)


def test_noise_level_measured(lab64):
    g = gen(resolution_probs=((1, 0, 0, 0), (1, 0, 0, 0)), mean_range=(80, 200))
    for seed in range(2):
        d = g(lab64, seed=seed)
        p = d["params"]
        assert (p["noise_std"][:2] <= 0.02).all()
        assert ((p["noise_std"][2:] >= 5) & (p["noise_std"][2:] <= 15)).all()
        for i in range(4):
            resid = (d["inputs"][i, 0] - d["clean"][i, 0]) * p["scale"][i]
            bright = d["clean"][i, 0] * p["scale"][i] > 60  # far from the clamp at 0
            measured = float(resid[bright].std())
            assert measured == pytest.approx(float(p["noise_std"][i]), rel=0.1, abs=0.01)


def grad_energy(x: torch.Tensor, axis: int) -> float:
    return float((torch.diff(x, dim=axis) ** 2).mean())


def effective_sigma(x: torch.Tensor, ref: torch.Tensor, axis: int) -> float:
    """Sigma (voxels) of the Gaussian blur along `axis` that gives `ref` the gradient energy of `x`."""
    target = grad_energy(x, axis)
    sig = torch.linspace(0.25, 8, 32)
    sigmas = torch.zeros(len(sig), 3)
    sigmas[:, axis] = sig
    blurred = gaussian_blur(ref[None].expand(len(sig), *ref.shape).contiguous(), sigmas)
    energies = torch.tensor([grad_energy(b, axis) for b in blurred])
    return float(sig[torch.argmin((energies - target).abs())])


def test_effective_resolution_measured(lab64):
    # no acquisition noise and no within-label texture (white texture would lose in-plane energy too
    # when averaged across slices): the images are piecewise smooth, their detail is their edges
    quiet = dict(noise_std=((0, 0), (0, 0)), std_range=(0.0, 0.0))
    # thick slices: detail along the thick axis drops, the in-plane axes keep theirs
    g = gen(resolution_probs=((0, 1, 0, 0), (0, 1, 0, 0)), **quiet)
    for seed in range(2):
        d = g(lab64, seed=seed)
        for i in range(4):
            sp = d["params"]["spacing"][i]
            thick = int(torch.argmax(sp))
            assert 2.5 <= float(sp[thick]) <= 8.5
            assert float(d["params"]["thickness"][i, thick]) <= float(sp[thick]) + 1e-6
            x, ref = d["inputs"][i, 0], d["clean"][i, 0]
            ratios = [grad_energy(x, a) / grad_energy(ref, a) for a in range(3)]
            assert ratios[thick] < 0.5 * min(r for a, r in enumerate(ratios) if a != thick)
            # effective resolution: the clean image blurred along the thick axis by which sigma
            # matches the sample's detail along that axis? Expected: the slice-thickness Gaussian
            # (ln5/pi * thickness) combined with linear interpolation between slices (variance s^2/6)
            sig_t = float(d["params"]["thickness"][i, thick]) * LN5_OVER_PI
            expected = math.sqrt(sig_t ** 2 + float(sp[thick]) ** 2 / 6)
            est = effective_sigma(x, ref, thick)
            assert 0.75 * expected < est < 1.4 * expected, (est, expected)


    # 1 mm: identical to the clean image when there is no noise
    d = gen(resolution_probs=((1, 0, 0, 0), (1, 0, 0, 0)), **quiet)(lab64, seed=0)
    assert torch.allclose(d["inputs"], d["clean"].clamp(0, 1), atol=1e-5)
    # iso-ish low resolution U(2,5) mm: all axes lose detail
    d = gen(resolution_probs=((0, 0, 0, 1), (0, 0, 0, 1)), **quiet)(lab64, seed=0)
    sp = d["params"]["spacing"]
    assert ((sp >= 2) & (sp <= 5)).all()
    for i in range(4):
        for a in range(3):
            assert grad_energy(d["inputs"][i, 0], a) < 0.7 * grad_energy(d["clean"][i, 0], a)
    # low-field-like: two axes 1.3-1.7 mm, one 5-5.4 mm
    d = gen(resolution_probs=((0, 0, 1, 0), (0, 0, 1, 0)), **quiet)(lab64, seed=0)
    sp, _ = d["params"]["spacing"].sort(dim=1)
    assert ((sp[:, :2] >= 1.3) & (sp[:, :2] <= 1.7)).all() and ((sp[:, 2] >= 5.0) & (sp[:, 2] <= 5.4)).all()


def test_gamma_range(lab64):
    g = gen(size=24)
    mild, severe = [], []
    for seed in range(20):
        lg = torch.log(g(lab64, seed=seed)["params"]["gamma"])
        mild += lg[:2].tolist()
        severe += lg[2:].tolist()
    assert max(abs(v) for v in mild) < 0.05          # std 0.01
    assert 0.05 < np.std(severe) < 0.2               # std 0.1


def test_severe_differs_more_than_mild(lab64):
    """Severe samples are further from the shared anatomy (the target) than mild ones: the deformed
    labels explain less of their variance (R^2 of per-label means; contrast-invariant)."""
    g = gen(size=40)
    r_mild, r_sev = [], []
    for seed in range(10):
        d = g(lab64, seed=seed)
        lab = d["labels"]
        for i in range(4):
            (r_mild if i < 2 else r_sev).append(r2_by_labels(d["inputs"][i, 0], lab))
    assert np.mean(r_sev) < np.mean(r_mild) - 0.05
    # and with resolution taken out of the comparison (all 1 mm): bias and noise alone
    g = gen(size=40, resolution_probs=((1, 0, 0, 0), (1, 0, 0, 0)))
    r = np.array([[r2_by_labels(d["inputs"][i, 0], d["labels"]) for i in range(4)]
                  for d in (g(lab64, seed=s) for s in range(8))])
    assert r[:, 2:].mean() < r[:, :2].mean() - 0.03


def test_curriculum_grows_share_and_strength(lab64):
    g = gen(size=16, schedule="curriculum", curriculum_steps=1000)
    early = torch.stack([g(lab64, seed=s, step=0)["severity"] for s in range(30)])
    late = torch.stack([g(lab64, seed=s, step=1000)["severity"] for s in range(30)])
    mid = torch.stack([g(lab64, seed=s, step=500)["severity"] for s in range(30)])
    share = [float((x > 0).float().mean()) for x in (early, mid, late)]
    strength = [float(x[x > 0].mean()) if (x > 0).any() else 0.0 for x in (early, mid, late)]
    assert share[0] <= share[1] <= share[2] and share[2] == pytest.approx(0.5, abs=0.05)
    assert strength[1] < strength[2] and strength[2] > 0.9
    # an explicit severity overrides the schedule and sets the ranges
    d = gen(size=16)(lab64, seed=0, severity=[0.5, 0.5])
    assert d["inputs"].shape[0] == 2
    assert (d["params"]["noise_std"] >= 2.5).all() and (d["params"]["noise_std"] <= 7.51).all()


def test_label_table_facts():
    t = default_table()
    luts = t.luts(600, "cpu")
    for l, r in LEFT_RIGHT_PAIRS + ((25, 57), (136, 163)):
        if l in t.classes or r in t.classes:
            assert luts["class"][l] == luts["class"][r], (l, r)
    assert luts["class"][2] != luts["class"][3]
    assert luts["class"][17] == luts["class"][18]       # SynthSeg: hippocampus and amygdala share a class
    assert luts["class"][0] == 0
    # unknown labels get their own class, shared with their partner when they have one
    assert luts["class"][599] not in set(luts["class"][[0, 2, 3, 4]].tolist())
    seg = to_segmentation(torch.tensor([0, 2, 41, 5, 502, 77, 999]))
    assert [SEGMENTATION_LABELS[i] for i in seg.tolist()] == [0, 2, 41, 4, 0, 77, 0]
    t1 = render_t1(torch.tensor([2, 3, 4, 502, 0]))
    assert float(t1[0]) == pytest.approx(1.0) and 0 < float(t1[2]) < float(t1[1]) < 1 and float(t1[3]) == 0


def test_dataset_with_dataloader_workers(tmp_path, lab64):
    nib = pytest.importorskip("nibabel")
    from torch.utils.data import DataLoader

    from BrainIDLib.synth import LabelMapDataset

    lab_dir, t1_dir = tmp_path / "labels", tmp_path / "t1"
    lab_dir.mkdir()
    t1_dir.mkdir()
    padded = torch.zeros((72, 72, 72), dtype=torch.int32)
    padded[4:68, 4:68, 4:68] = lab64
    for k in range(2):
        nib.save(nib.Nifti1Image(np.roll(padded.numpy(), k, axis=1), np.eye(4)), str(lab_dir / f"s{k}.nii.gz"))
    t1 = (render_t1(padded) * 110).numpy().astype(np.float32)
    nib.save(nib.Nifti1Image(t1, np.eye(4)), str(t1_dir / "s0.nii.gz"))

    ds = LabelMapDataset(lab_dir, t1_dir=t1_dir, size=(32, 32, 32), seed=7, length=4)
    direct = [ds[i] for i in range(4)]
    loader = DataLoader(ds, batch_size=None, num_workers=2, shuffle=False)
    got = list(loader)
    assert len(got) == 4
    for a, b in zip(direct, got):
        assert a["name"] == b["name"]
        # workers run 1 thread, this process 2: float sums may differ in the last bits
        assert torch.equal(a["segmentation"], b["segmentation"]) and torch.equal(a["labels"], b["labels"])
        for key in ("inputs", "target_t1", "clean", "bias_field"):
            assert torch.allclose(a[key], b[key], atol=1e-5, rtol=1e-5), key
    assert direct[0]["name"] == "s0.nii.gz" and direct[1]["name"] == "s1.nii.gz"
    # T1 target for s0 (WM median 1), canonical render for s1 -- both WM = 1
    for d in direct[:2]:
        wm = d["target_t1"][0][(d["labels"] == 2) | (d["labels"] == 41)]
        assert abs(float(wm.median()) - 1) < 0.05
    assert not torch.equal(direct[0]["inputs"], direct[2]["inputs"])  # other index, other draw
    raw = LabelMapDataset(lab_dir, generate=False, margin=2)[1]
    assert raw["labels"].dtype == torch.int32 and max(raw["labels"].shape) < 72      # cropped to the head
    assert int((raw["labels"] > 0).sum()) == int((padded > 0).sum())                 # nothing lost
    assert raw["t1"].numel() == 0


def test_label_maps_not_1mm_warn_once_per_set(tmp_path, lab64):
    """A set of 2 mm maps warns once, naming them, when the set is opened; loading them does not
    repeat it (each worker process would, once per map)."""
    import warnings

    nib = pytest.importorskip("nibabel")
    from BrainIDLib.synth import LabelMapDataset, load_label_map

    for k in range(4):
        nib.save(nib.Nifti1Image(lab64.numpy(), np.diag([2.0, 2.0, 2.0, 1.0])), str(tmp_path / f"m{k}.nii.gz"))
    nib.save(nib.Nifti1Image(lab64.numpy(), np.eye(4)), str(tmp_path / "ok.nii.gz"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = LabelMapDataset(tmp_path, generate=False, length=5)
        items = [ds[i] for i in range(5)]
    msgs = [str(w.message) for w in caught]
    assert len(msgs) == 1, msgs
    assert "m0.nii.gz (2.0 x 2.0 x 2.0 mm)" in msgs[0] and "1 more" in msgs[0] and "ok.nii.gz" not in msgs[0]
    assert len(items) == 5
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_label_map(tmp_path / "m1.nii.gz")
        load_label_map(tmp_path / "ok.nii.gz")
    assert [("m1.nii.gz" in str(w.message)) for w in caught] == [True]


def test_custom_label_table_shares_class_intensities():
    """An arbitrary table: labels 1 and 2 form one generation class, 3 another; 7 is unknown."""
    lab = torch.zeros((32, 32, 32), dtype=torch.int32)
    lab[4:28, 4:28, 4:12] = 1
    lab[4:28, 4:28, 12:20] = 2
    lab[4:28, 4:28, 20:28] = 3
    lab[10:20, 10:20, 14:18] = 7
    g = SubjectGenerator(size=(24, 24, 24), label_table={0: 0, 1: 1, 2: 1, 3: 2}, std_range=(0.0, 0.0),
                         resolution_probs=((1, 0, 0, 0), (1, 0, 0, 0)), nonlin_std_max=0.0, flip_prob=0.0)
    d = g(lab, seed=0)
    for i in range(2):  # mild: no noise, tiny bias -> per-class means are visible directly
        x = d["clean"][i, 0] / d["bias_field"][i, 0]
        m = {k: float(x[d["labels"] == k].mean()) for k in (1, 2, 3, 7)}
        s = {k: float(x[d["labels"] == k].std()) for k in (1, 2)}
        assert abs(m[1] - m[2]) < 1e-3 and max(s.values()) < 1e-3
        assert abs(m[1] - m[3]) > 1e-3 and abs(m[7] - m[1]) > 1e-3


def test_preview_png(tmp_path, lab64):
    nib = pytest.importorskip("nibabel")
    pytest.importorskip("matplotlib")
    from training.synth_preview import main, write_preview

    f = tmp_path / "phantom.nii.gz"
    nib.save(nib.Nifti1Image(lab64.numpy(), np.eye(4)), str(f))
    out = write_preview(tmp_path, tmp_path / "p.png", seed=1, size=32)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["--labels", str(tmp_path / "missing"), "--out", str(tmp_path / "q.png")]) == 2


def test_background_is_class_zero_in_any_table():
    from BrainIDLib.synth import LabelTable

    t = LabelTable({5: 3, 6: 3, 9: 0})     # no label 0, and another label uses class id 0
    luts = t.luts(10, "cpu")
    assert luts["class"][0] == 0 and luts["class"][9] != 0 and luts["class"][5] == luts["class"][6]


def test_dataset_curriculum_counts_items_as_steps(tmp_path, lab64):
    nib = pytest.importorskip("nibabel")
    from BrainIDLib.synth import LabelMapDataset

    nib.save(nib.Nifti1Image(lab64.numpy(), np.eye(4)), str(tmp_path / "a.nii.gz"))
    ds = LabelMapDataset(tmp_path, size=(16, 16, 16), length=10, cache=1, schedule="curriculum", curriculum_steps=20)
    assert float(ds[0]["severity"].max()) == 0.0             # step 0: no severe sample yet
    ds.set_epoch(3)                                           # steps 30..39: past the end of the curriculum
    sev = torch.stack([ds[i]["severity"] for i in range(4)])
    assert torch.equal(sev, torch.tensor([[0.0, 0.0, 1.0, 1.0]] * 4))


def test_separable_resampling_matches_trilinear():
    """The low-res grid of the resolution step: cell centres, linear upsampling == trilinear
    interpolation with align_corners=False (what the generator calls)."""
    import torch.nn.functional as F

    from BrainIDLib.synth.filters import apply_along, downsample_matrix, upsample_matrix

    y = torch.rand(7, 11, 5, generator=torch.Generator().manual_seed(0))
    ref = F.interpolate(y[None, None], size=(20, 33, 16), mode="trilinear", align_corners=False)[0, 0]
    sep = y
    for ax, n in enumerate((20, 33, 16)):
        sep = apply_along(sep, upsample_matrix(n, y.shape[ax]), ax)
    assert torch.allclose(sep, ref, atol=1e-5)
    # the blur+downsample matrix keeps constants constant (no darkening at the borders)
    M = downsample_matrix(40, 9, 2.0)
    assert torch.allclose(M.sum(dim=1), torch.ones(9), atol=1e-6)
