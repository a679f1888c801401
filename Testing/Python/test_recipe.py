"""Training recipe faithful to Brain-ID: real-image adaptation data (deformation, flip with label
swap, mild corruption on the generator's code), one anatomy-target convention, official-format
export, head provenance, MS-SSIM."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainIDLib.synth import SubjectGenerator
from BrainIDLib.synth.targets import anatomy_target
from test_training import phantom
from training.data import NiftiSteps

# T1-like intensities with different left and right cortex, so that a flip shows in the image
T1_MEANS = {0: 0, 24: 30, 3: 80, 42: 60, 2: 120, 41: 120, 4: 30, 43: 30, 10: 100, 49: 100}


def _render(lab: np.ndarray, means=T1_MEANS) -> np.ndarray:
    lut = np.zeros(max(means) + 1, np.float32)
    for k, v in means.items():
        lut[k] = v
    return lut[lab]


@pytest.fixture(scope="module")
def real_subject(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("real")
    lab = phantom((40, 44, 36), 3).astype(np.int32)
    t1 = _render(lab) * 3.7 + 2.0  # arbitrary scanner scale and offset
    paths = {}
    for key, arr in (("image", t1), ("labels", lab), ("t1", t1)):
        paths[key] = str(d / f"{key}.nii.gz")
        nib.save(nib.Nifti1Image(arr, np.eye(4)), paths[key])
    return {"paths": paths, "labels": lab}


def _steps(paths: dict, corruption="mild", **data) -> NiftiSteps:
    cfg = {"subjects": [paths], "size": [32, 32, 32], "subjects_per_step": 1, "mild": 2, **data}
    return NiftiSteps(cfg, seed=0, corruption=corruption)


def _best_crop_agreement(drawn: np.ndarray, original: np.ndarray) -> float:
    """Largest fraction of equal voxels between `drawn` and any axis-aligned crop of `original` or of
    its left/right mirror with labels swapped (what a crop-and-flip without deformation gives)."""
    swap = np.arange(original.max() + 1)
    for a, b in ((3, 42), (2, 41), (4, 43), (10, 49)):
        swap[a], swap[b] = b, a
    best = 0.0
    for src in (original, swap[original[::-1]]):
        pad = np.pad(src, 4)  # a crop may reach a little outside the volume
        windows = np.lib.stride_tricks.sliding_window_view(pad, drawn.shape)
        for i in range(windows.shape[0]):
            best = max(best, float((windows[i] == drawn).mean(axis=(-3, -2, -1)).max()))
    return best


def test_real_adaptation_draws_are_deformed_not_cropped(real_subject):
    steps = _steps(real_subject["paths"])
    agreements = []
    for seed in range(3):
        draw = steps.draw(0, seed)
        labels = draw["labels"].numpy()
        assert labels.shape == (32, 32, 32) and draw["inputs"].shape == (2, 1, 32, 32, 32)
        agreements.append(_best_crop_agreement(labels, real_subject["labels"]))
    # a plain (flipped) crop would agree exactly somewhere; rotation/scale/nonlinear warps do not
    assert max(agreements) < 0.9, agreements


def test_real_draws_flip_swaps_labels_and_keep_everything_aligned(real_subject):
    steps = _steps(real_subject["paths"], corruption="none")
    flipped_seen = unflipped_seen = False
    for seed in range(8):
        d = steps.draw(0, seed)
        lab, img = d["labels"], d["clean"][0, 0]
        # every output of a draw is on one grid: the image is the labels' render (up to edges)
        core = torch.from_numpy(_render(lab.numpy())) / T1_MEANS[2]
        inside = lab == 2
        assert (img[inside] / img[inside].median() - core[inside]).abs().median() < 0.02
        assert torch.equal(d["mask"], lab > 0) and torch.equal(d["inputs"][0, 0], d["clean"][0, 0])
        # left labels stay on the low side of axis 0 (RAS) after a flip, because ids are swapped
        x = torch.arange(32.0)[:, None, None].expand(32, 32, 32)
        assert x[lab == 3].mean() < x[lab == 42].mean()
        # the flip moved the right hemisphere's intensity (60) under the left cortex label (3)
        ratio = float(img[lab == 3].median() / img[lab == 2].median())
        if bool(d["flipped"]):
            flipped_seen = True
            assert ratio == pytest.approx(60 / 120, abs=0.05)
        else:
            unflipped_seen = True
            assert ratio == pytest.approx(80 / 120, abs=0.05)
    assert flipped_seen and unflipped_seen


def test_real_draws_use_the_generators_mild_corruption(real_subject):
    d = _steps(real_subject["paths"]).draw(0, 5)
    assert set(d) >= {"inputs", "clean", "bias_field", "target_t1", "segmentation", "labels", "mask"}
    assert float(d["inputs"].max()) == pytest.approx(1.0) and float(d["inputs"].min()) >= 0
    # mild bias field: exp(N(0, <=0.02)) on a coarse grid; not flat, not strong
    assert 0 < float((d["bias_field"] - 1).abs().max()) < 0.15
    # forcing a regime (evaluation) is deterministic and changes only the resolution
    steps = _steps(real_subject["paths"])
    a, b = steps.draw(0, 7, regime=0), steps.draw(0, 7, regime=3)
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["target_t1"], b["target_t1"])
    assert torch.equal(steps.draw(0, 7, regime=3)["inputs"], b["inputs"])
    assert not torch.allclose(a["inputs"], b["inputs"], atol=0.05)


def test_one_anatomy_target_convention_on_both_paths(real_subject):
    lab = torch.from_numpy(real_subject["labels"])
    t1 = torch.from_numpy(_render(real_subject["labels"]) * 3.7 + 2.0)
    # synthetic path: the generator's deformed T1, divided by its WM median
    gen = SubjectGenerator(size=(32, 32, 32))
    draw = gen(lab, t1=t1, seed=1)
    wm = (draw["labels"] == 2) | (draw["labels"] == 41)
    assert float(draw["target_t1"][0][wm].median()) == pytest.approx(1.0, abs=1e-4)
    # real path: the same convention (the old min-max put WM at ~0.27 of a 0.5-99.5% range here)
    real = _steps(real_subject["paths"]).draw(0, 1)
    wm = (real["labels"] == 2) | (real["labels"] == 41)
    assert float(real["target_t1"][0][wm].median()) == pytest.approx(1.0, abs=1e-4)
    # the helper itself; without labels it divides by the 99.5th percentile of the positive voxels,
    # so a few hot voxels do not move the scale (WM is the brightest tissue of this phantom)
    assert float(anatomy_target(t1, lab)[lab == 41].median()) == pytest.approx(1.0)
    hot = t1.clone()
    hot[:2, :2, :2] = 1e4
    assert float(anatomy_target(hot)[lab == 2].median()) == pytest.approx(1.0)
    assert float(anatomy_target(hot).max()) > 10


# --- official-format export -----------------------------------------------------------------

from test_training import label_dir, smoke  # noqa: E402,F401 - the phantom label maps fixture
from test_weights import OFFICIAL_HEADS, official_key_shapes  # noqa: E402 - the official key list

import BrainIDLib as bid  # noqa: E402
from BrainIDLib.model import Architecture, BrainIDModel  # noqa: E402
from BrainIDLib.weights import save_model  # noqa: E402
from training.cli import main  # noqa: E402
from training.export_official import export_official  # noqa: E402

ALL_HEADS = {"anatomy": 1, "segmentation": 33, "super_resolution": 1, "bias_field": 1}


def _tensor_file(path) -> dict:
    obj = torch.load(path, map_location="cpu", weights_only=True)  # tensors only, no pickled objects
    assert set(obj) == {"model"}
    return {k: tuple(v.shape) for k, v in obj["model"].items()}


@pytest.mark.slow
def test_full_size_export_has_exactly_the_official_keys(tmp_path):
    model = BrainIDModel(Architecture(), heads=ALL_HEADS)  # f_maps 64, random weights
    files = export_official(model, tmp_path, "full")
    assert set(files) == {"model"} | {f"{t}_head" for t in ALL_HEADS}
    found = _tensor_file(files["model"])
    assert list(found) == list(official_key_shapes()) and found == official_key_shapes()
    for task in ALL_HEADS:
        assert _tensor_file(files[f"{task}_head"]) == OFFICIAL_HEADS[task], task
    assert not list(tmp_path.glob(".*"))  # no temporary files left


def test_export_cli_round_trips_through_the_official_loader(tmp_path):
    torch.manual_seed(3)
    model = BrainIDModel(Architecture(f_maps=8, levels=3), heads=ALL_HEADS).eval()  # 8 groups, as official
    for p in model.parameters():  # non-default values everywhere, GroupNorm affine included
        p.data.normal_(0, 0.3)
    src = save_model(model, tmp_path / "small.safetensors")
    out = tmp_path / "official"
    assert main(["export", "--official", "--weights", str(src), "--out", str(out)]) == 0
    pretrained = out / "small_pretrained.pth"
    heads = {t: out / f"small_{t}_head.pth" for t in ALL_HEADS if t != "anatomy"}
    loaded = bid.load_model(pretrained, heads=heads)  # strict key/shape checks
    assert set(loaded.tasks) == set(ALL_HEADS)
    x = torch.rand(1, 1, 16, 16, 16)
    with torch.no_grad():
        feats = model.features(x)
        torch.testing.assert_close(loaded.features(x), feats, rtol=0, atol=0)
        for task in ALL_HEADS:
            torch.testing.assert_close(loaded.apply_head(task, feats, x), model.apply_head(task, feats, x), rtol=0, atol=0)
    # the anatomy head also has its own downstream file, and --heads-only skips the backbone
    only = tmp_path / "heads"
    assert main(["export", "--official", "--heads-only", "--weights", str(src), "--name", "h", "--out", str(only)]) == 0
    assert sorted(p.name for p in only.iterdir()) == sorted(f"h_{t}_head.pth" for t in ALL_HEADS)


def test_export_refuses_unclear_requests(tmp_path, capsys):
    model = BrainIDModel(Architecture(f_maps=8, levels=3, num_groups=4), heads={"segmentation": 33})
    src = save_model(model, tmp_path / "seg_only.safetensors")
    assert main(["export", "--weights", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "add --official" in capsys.readouterr().err
    assert main(["export", "--official", "--weights", str(src), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("brainid-train: error:") and "--heads-only" in err and len(err.strip().splitlines()) == 1
    # the official layout cannot say "4 groups": such a file would load as another network
    four = save_model(BrainIDModel(Architecture(f_maps=8, levels=3, num_groups=4), heads={"anatomy": 1}),
                      tmp_path / "four.safetensors")
    assert main(["export", "--official", "--weights", str(four), "--out", str(tmp_path / "o")]) == 1
    assert "4 groups" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


# --- provenance -----------------------------------------------------------------------------

def _header(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["brainid"])


def test_heads_trained_on_an_official_backbone_say_so(label_dir, tmp_path):
    # an official-layout backbone (as released: torch file, backbone.* + head.final_conv_image.*)
    base = BrainIDModel(Architecture(f_maps=8, levels=3), heads={"anatomy": 1})
    official = export_official(base, tmp_path, "tiny")["model"]
    assert bid.load_model(official).metadata["source"] == "official Brain-ID release"
    run = tmp_path / "adapt"
    assert main(["adapt", *smoke(label_dir, run, "--set", "run.max_steps=1", "--set", f"model.init={official}",
                                 "--set", "adapt.tasks=[segmentation]")]) == 0
    from BrainIDLib.files import sha256_of

    meta = _header(run / "segmentation_head.safetensors")
    assert meta["source"] == f"head trained by BrainID on tiny_pretrained.pth (sha256 {sha256_of(official)})"
    assert "official" not in json.dumps(meta).replace("tiny_pretrained", "")
    entry = json.loads((run / "models_json_entries.json").read_text())[0]
    assert entry["source"] == meta["source"]


# --- MS-SSIM --------------------------------------------------------------------------------

from BrainIDLib import metrics as M  # noqa: E402


def _smooth(shape, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *[s + 4 for s in shape]), generator=g, dtype=torch.float64)
    pool = torch.nn.functional.avg_pool3d if len(shape) == 3 else torch.nn.functional.avg_pool2d
    return pool(x, 5, 1)[0, 0]


def _noisy(x, std, seed) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (x + std * torch.randn(x.shape, generator=g, dtype=torch.float64)).clamp(0, 1)


def test_ms_ssim_known_answers():
    x = _smooth((48, 48, 48), 0)
    assert M.ms_ssim(x, x) == pytest.approx(1.0, abs=1e-12)
    a, b = M.ms_ssim(_noisy(x, 0.02, 1), x, 1.0), M.ms_ssim(_noisy(x, 0.1, 1), x, 1.0)
    assert 1 > a > b > 0
    # scales: every axis must span the 11-voxel window at the coarsest one; weights renormalised
    assert [M.ms_ssim_scales(s) for s in [(176,) * 3, (161,) * 3, (160,) * 3, (128,) * 3, (48,) * 3, (24, 200, 200),
                                          (1, 200, 200), (10, 30, 30)]] == [5, 5, 4, 4, 3, 2, 5, 1]
    small = _smooth((10, 30, 30), 2)
    assert M.ms_ssim(_noisy(small, 0.1, 3), small, 1.0) == pytest.approx(M.ssim(_noisy(small, 0.1, 3), small, 1.0))
    # hand-computed: two constant images have cs = 1 at every scale, so MS-SSIM is the coarsest
    # scale's luminance term l = (2ab + C1) / (a^2 + b^2 + C1) to the power of its weight
    c1 = (0.01 * 1.0) ** 2
    lum = (2 * 0.5 * 0.4 + c1) / (0.5**2 + 0.4**2 + c1)
    flat = lambda v, shape: torch.full(shape, v, dtype=torch.float64)  # noqa: E731
    assert M.ms_ssim(flat(0.4, (1, 176, 176)), flat(0.5, (1, 176, 176)), 1.0) == pytest.approx(lum**0.1333, rel=1e-12)
    w3 = 0.3001 / (0.0448 + 0.2856 + 0.3001)  # 48^3: three scales, weights renormalised
    assert M.ms_ssim(flat(0.4, (48,) * 3), flat(0.5, (48,) * 3), 1.0) == pytest.approx(lum**w3, rel=1e-12)
    # a volume constant along one axis scores as its slice does (same scales: window 3 fits 5 of them)
    s2 = _smooth((48, 48), 4)
    n2 = _noisy(s2, 0.05, 5)
    vol = lambda im: im[None].expand(48, -1, -1)  # noqa: E731
    assert M.ms_ssim(vol(n2), vol(s2), 1.0, window=3) == pytest.approx(M.ms_ssim(n2, s2, 1.0, window=3), abs=1e-12)
    both = M.image_metrics(_noisy(x, 0.05, 6), x)  # SSIM and MS-SSIM from one pass
    assert both["ssim"] == M.ssim(_noisy(x, 0.05, 6), x) and both["ms_ssim"] == M.ms_ssim(_noisy(x, 0.05, 6), x)


def test_ms_ssim_matches_pytorch_msssim():
    ref = pytest.importorskip("pytorch_msssim")  # the test extra installs it
    window = torch.exp(-(torch.arange(3, dtype=torch.float64) - 1) ** 2 / (2 * 1.5**2))
    window = window / window.sum()  # float64 (the package's default window is float32)
    x = _smooth((48, 48, 48), 6)  # even sizes at every pooled scale: both halve the same way
    y = _noisy(x, 0.05, 7)
    theirs = float(ref.ms_ssim(y[None, None], x[None, None], data_range=1.0, win=window.view(1, 1, 1, 1, 3)))
    assert M.ms_ssim(y, x, 1.0, window=3) == pytest.approx(theirs, abs=1e-12)
    # the 2D reference: our 3D value on a volume constant along one axis equals theirs on the slice
    s2, n2 = x[0], y[0]
    theirs_2d = float(ref.ms_ssim(n2[None, None], s2[None, None], data_range=1.0, win=window.view(1, 1, 1, 3)))
    assert M.ms_ssim(n2[None].expand(48, -1, -1), s2[None].expand(48, -1, -1), 1.0, window=3) == pytest.approx(
        theirs_2d, abs=1e-12)


def test_real_subjects_off_the_image_grid_fail_at_start(real_subject, tmp_path, capsys):
    from training.cli import main as train_main

    bad = tmp_path / "labels_shifted.nii.gz"
    shifted = np.eye(4)
    shifted[0, 3] = 5.0
    nib.save(nib.Nifti1Image(real_subject["labels"], shifted), str(bad))
    manifest = tmp_path / "subjects.json"
    manifest.write_text(json.dumps([{**real_subject["paths"], "labels": str(bad)}]))
    model = save_model(BrainIDModel(Architecture(f_maps=8, levels=3), heads={"anatomy": 1}), tmp_path / "m.safetensors")
    code = train_main(["adapt", "--config", "smoke", "--set", f"run.dir={tmp_path / 'run'}", "--set", f"model.init={model}",
                       "--set", "data.source=nifti", "--set", f"data.subjects={manifest}"])
    err = capsys.readouterr().err
    assert code == 1 and "is not on the grid of its image" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run" / "checkpoints").exists()
