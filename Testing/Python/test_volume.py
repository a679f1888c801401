"""Loading, validation, reorientation and resampling of scans (BrainIDLib.volume)."""

import gzip
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch

from BrainIDLib.errors import BrainIDError
from BrainIDLib.volume import Volume, load_volume, prepare, voxel_sizes


def rotation(ax, deg):
    t = np.deg2rad(deg)
    c, s = np.cos(t), np.sin(t)
    r = np.eye(3)
    i, j = [(1, 2), (0, 2), (0, 1)][ax]
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


def make_affine(codes_matrix, spacing, origin=(10.0, -20.0, 5.0), rot=None):
    a = np.eye(4)
    m = np.asarray(codes_matrix, dtype=float) @ np.diag(spacing)
    if rot is not None:
        m = rot @ m
    a[:3, :3] = m
    a[:3, 3] = origin
    return a


RAS = np.eye(3)
LPS = np.diag([-1.0, -1.0, 1.0])
LIA = np.array([[-1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])  # i->L, j->I, k->A
AFFINES = {
    "RAS-1mm": make_affine(RAS, (1, 1, 1)),
    "LPS-1mm": make_affine(LPS, (1, 1, 1)),
    "LIA-1mm": make_affine(LIA, (1, 1, 1)),
    "LPS-aniso": make_affine(LPS, (0.8, 1.3, 1.7)),
    "LIA-oblique": make_affine(LIA, (1.1, 0.9, 1.2), rot=rotation(0, 12) @ rotation(2, -8)),
    "thick-slice": make_affine(RAS, (0.9, 0.9, 5.0)),
}
NORM = {"method": "minmax", "percentiles": [0.0, 100.0]}


def world_linear(affine, shape, coef=(0.3, -0.2, 0.5)):
    """A linear function of world coordinates sampled on a grid: exact under linear interpolation."""
    ijk = np.stack(np.meshgrid(*[np.arange(s) for s in shape], indexing="ij"), -1).reshape(-1, 3)
    xyz = ijk @ affine[:3, :3].T + affine[:3, 3]
    return (xyz @ np.asarray(coef)).reshape(shape).astype(np.float32), xyz


@pytest.mark.parametrize("name", list(AFFINES))
def test_orientation_round_trip_is_exact_without_resampling(name):
    affine = AFFINES[name]
    vol = Volume(np.random.default_rng(0).random((13, 11, 9)).astype(np.float32), affine)
    prep = prepare(vol, spacing_mm=[1, 1, 1], normalisation=NORM, multiple=4)
    # resample at the input's own spacing (in RAS order): the round trip must be exact
    ras_spacing = voxel_sizes(affine @ nib.orientations.inv_ornt_aff(prep.ornt, vol.shape))
    prep = prepare(vol, spacing_mm=ras_spacing, normalisation=NORM, multiple=4)
    assert all(p % 4 == 0 for p in prep.tensor.shape[2:])
    back = prep.to_input_grid(prep.tensor[0])[0].numpy()
    expected = (vol.array - vol.array.min()) / (vol.array.max() - vol.array.min())
    np.testing.assert_allclose(back, expected, atol=1e-6)
    # the model grid is RAS: its affine's axes point (mostly) along +x, +y, +z
    axes = nib.orientations.aff2axcodes(prep.grid_affine)
    assert axes == ("R", "A", "S")


@pytest.mark.parametrize("name", list(AFFINES))
def test_model_grid_affine_matches_the_data(name):
    """Values on the 1 mm grid are the input's world function at the grid's world positions."""
    affine = AFFINES[name]
    shape = (24, 22, 20) if name != "thick-slice" else (24, 22, 6)
    data, _ = world_linear(affine, shape)
    vol = Volume(data, affine)
    prep = prepare(vol, spacing_mm=[1, 1, 1], normalisation={"method": "none"}, multiple=4)
    np.testing.assert_allclose(voxel_sizes(prep.grid_affine), [1, 1, 1], atol=1e-6)
    grid = prep.crop(prep.tensor[0, 0]).numpy()
    expected, xyz = world_linear(prep.grid_affine, grid.shape)
    # compare inside the input's field of view, away from the edges (clamped there)
    inv = np.linalg.inv(affine)
    ijk = xyz @ inv[:3, :3].T + inv[:3, 3]
    margin = np.array([3 * s for s in np.maximum(1.0, 1.0 / voxel_sizes(affine))])
    inside = np.all((ijk >= margin / voxel_sizes(affine) + 1) & (ijk <= np.array(shape) - 2 - margin / voxel_sizes(affine)), axis=1)
    if name == "thick-slice":  # only 6 slices: use the central ones
        inside = np.all((ijk[:, :2] >= 3) & (ijk[:, :2] <= np.array(shape[:2]) - 4), axis=1) & (ijk[:, 2] >= 1) & (ijk[:, 2] <= 4)
    assert inside.sum() > 50
    np.testing.assert_allclose(grid.reshape(-1)[inside], expected.reshape(-1)[inside], atol=1e-3)


@pytest.mark.parametrize("name", ["LPS-aniso", "LIA-oblique", "thick-slice"])
def test_resampled_and_mapped_back_reproduces_the_input(name):
    affine = AFFINES[name]
    shape = (26, 24, 22) if name != "thick-slice" else (26, 24, 8)
    data, _ = world_linear(affine, shape)
    vol = Volume(data, affine)
    prep = prepare(vol, spacing_mm=[1, 1, 1], normalisation={"method": "none"}, multiple=8)
    back = prep.to_input_grid(prep.tensor[0])[0].numpy()
    assert back.shape == shape
    core = (slice(3, -3), slice(3, -3), slice(1, -1) if name == "thick-slice" else slice(3, -3))
    np.testing.assert_allclose(back[core], data[core], atol=2e-3)


def test_downsampling_is_anti_aliased():
    """A 0.5 mm checkerboard (Nyquist) averages out instead of aliasing at 1 mm."""
    a = np.indices((64, 64, 64)).sum(0) % 2
    vol = Volume(a.astype(np.float32), make_affine(RAS, (0.5, 0.5, 0.5)))
    prep = prepare(vol, spacing_mm=[1, 1, 1], normalisation={"method": "none"}, multiple=4)
    grid = prep.crop(prep.tensor[0, 0])
    assert grid.shape == (32, 32, 32)
    assert float(grid[4:-4, 4:-4, 4:-4].std()) < 0.05
    assert abs(float(grid.mean()) - 0.5) < 0.02


def test_normalisation_minmax_and_percentiles():
    rng = np.random.default_rng(0)
    data = rng.normal(100, 10, (20, 20, 20)).astype(np.float32)
    data[0, 0, 0] = 10000  # an outlier
    vol = Volume(data, np.eye(4))
    x = prepare(vol, [1, 1, 1], NORM, multiple=4).tensor
    assert float(x.min()) == 0.0 and abs(float(x.max()) - 1) < 1e-6
    x = prepare(vol, [1, 1, 1], {"method": "minmax", "percentiles": [1, 99]}, multiple=4).tensor
    core = x[0, 0, :20, :20, :20]
    assert float(core.max()) == pytest.approx(1.0) and float(core.median()) > 0.3  # outlier clipped


def test_integer_input_and_scaling(tmp_path):
    data = (np.arange(8 * 9 * 10).reshape(8, 9, 10) % 50).astype(np.int16)
    img = nib.Nifti1Image(data, np.diag([1.5, 1.5, 1.5, 1]))
    img.header.set_slope_inter(2.0, 1.0)
    nib.save(img, tmp_path / "int.nii.gz")
    vol = load_volume(tmp_path / "int.nii.gz")
    assert vol.array.dtype == np.float32
    np.testing.assert_allclose(vol.array, data * 2.0 + 1.0)


def test_sform_wins_over_qform(tmp_path):
    """BrainID uses nibabel's img.affine: the sform when set, the qform only without an sform."""
    data = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    sform = make_affine(LPS, (1.0, 1.0, 1.2))
    qform = make_affine(RAS, (1.0, 1.0, 1.0), origin=(0, 0, 0))
    img = nib.Nifti1Image(data, None)
    img.set_qform(qform, code=1)
    img.set_sform(sform, code=2)
    nib.save(img, tmp_path / "both.nii.gz")
    np.testing.assert_allclose(load_volume(tmp_path / "both.nii.gz").affine, sform, atol=1e-5)
    img.set_sform(sform, code=0)  # sform unset: the qform is used
    nib.save(img, tmp_path / "qonly.nii.gz")
    np.testing.assert_allclose(load_volume(tmp_path / "qonly.nii.gz").affine, qform, atol=1e-5)


def test_4d_with_one_volume_is_accepted(tmp_path):
    data = np.random.default_rng(0).random((10, 11, 12, 1)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.eye(4)), tmp_path / "one.nii.gz")
    assert load_volume(tmp_path / "one.nii.gz").shape == (10, 11, 12)


def test_volume_from_nifti_and_back():
    data = np.random.default_rng(0).random((10, 11, 12)).astype(np.float32)
    aff = AFFINES["LIA-oblique"]
    vol = Volume.from_nifti(nib.Nifti1Image(data, aff))
    img = vol.to_nifti()
    np.testing.assert_array_equal(img.get_fdata(dtype=np.float32), data)
    np.testing.assert_allclose(img.affine, aff)


# --------------------------------------------------------------------------------- bad input
def _save(tmp_path, data, affine=np.eye(4), name="x.nii.gz"):
    path = tmp_path / name
    nib.save(nib.Nifti1Image(np.asarray(data, dtype=np.float32), affine), path)
    return path


def _one_line(e):
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(BrainIDError, match="not found"):
        load_volume(tmp_path / "nope.nii.gz")


def test_not_nifti(tmp_path):
    p = tmp_path / "notes.nii.gz"
    p.write_text("this is not an image")
    with pytest.raises(BrainIDError) as e:
        load_volume(p)
    assert "NIfTI" in _one_line(e)
    p = tmp_path / "picture.png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with pytest.raises(BrainIDError):
        load_volume(p)


def test_corrupt_gzip(tmp_path):
    p = _save(tmp_path, np.random.default_rng(0).random((30, 30, 30)))
    raw = p.read_bytes()
    p.write_bytes(raw[: len(raw) // 2])  # truncated download
    with pytest.raises(BrainIDError) as e:
        load_volume(p)
    assert "corrupt" in _one_line(e) or "readable" in _one_line(e)
    q = tmp_path / "garbled.nii.gz"
    q.write_bytes(gzip.compress(b"\0" * 10) + b"garbage")
    with pytest.raises(BrainIDError):
        load_volume(q)


def test_4d_series(tmp_path):
    p = _save(tmp_path, np.random.default_rng(0).random((10, 10, 10, 3)))
    with pytest.raises(BrainIDError) as e:
        load_volume(p)
    msg = _one_line(e)
    assert "3 volumes" in msg and "dimension 4" in msg and "pick one" in msg


def test_constant_and_empty(tmp_path):
    with pytest.raises(BrainIDError, match="constant"):
        load_volume(_save(tmp_path, np.zeros((10, 10, 10))))
    with pytest.raises(BrainIDError, match="constant"):
        load_volume(_save(tmp_path, np.full((10, 10, 10), 7.0), name="c.nii.gz"))


def test_nan_inf(tmp_path):
    data = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    data[0, 0, :3] = [np.nan, np.inf, -np.inf]
    with pytest.warns(UserWarning, match="NaN/Inf"):
        vol = load_volume(_save(tmp_path, data))
    assert np.isfinite(vol.array).all() and vol.array[0, 0, 0] == 0
    with pytest.raises(BrainIDError, match="NaN or Inf"):
        load_volume(_save(tmp_path, np.full((10, 10, 10), np.nan), name="n.nii.gz"))
    half = np.random.default_rng(0).random((10, 10, 10)).astype(np.float32)
    half[:6] = np.nan
    with pytest.raises(BrainIDError, match="NaN or Inf"):
        load_volume(_save(tmp_path, half, name="h.nii.gz"))


@pytest.mark.parametrize("spacing", [0.01, 25.0])
def test_absurd_spacing(tmp_path, spacing):
    data = np.random.default_rng(0).random((20, 20, 20))
    with pytest.raises(BrainIDError) as e:
        load_volume(_save(tmp_path, data, np.diag([spacing, 1, 1, 1])))
    assert "voxel size" in _one_line(e)


def test_tiny_volume(tmp_path):
    with pytest.raises(BrainIDError, match="too small"):
        load_volume(_save(tmp_path, np.random.default_rng(0).random((5, 20, 20))))
    with pytest.raises(BrainIDError, match="too small"):
        load_volume(_save(tmp_path, np.random.default_rng(0).random((20, 20, 1)), name="s.nii.gz"))
    # 3 thick slices of 5 mm is a usable (if coarse) volume
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_volume(_save(tmp_path, np.random.default_rng(0).random((20, 20, 3)), np.diag([1, 1, 5.0, 1]), "t.nii.gz"))


def test_broken_affine(tmp_path):
    with pytest.raises(BrainIDError):
        load_volume(Volume(np.random.default_rng(0).random((10, 10, 10)), np.zeros((4, 4))))


def test_wrong_python_type():
    with pytest.raises(BrainIDError):
        load_volume(torch.zeros(3))


def test_saved_files_get_normal_permissions(tmp_path):
    """Atomic writes go through mkstemp (0600); the result must be readable like any new file."""
    import os
    import stat

    from BrainIDLib.files import save_nifti

    path = save_nifti(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "x.nii.gz")
    mask = os.umask(0o022)
    os.umask(mask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
