"""Build BrainID's shipped sample volume from the MNI ICBM152 2009 template inside nilearn.

Offline and reproducible: nilearn ships the 1 mm skull-stripped T1 template and its brain mask in
the package itself. The script masks the brain, resamples it to 1.5 mm with Gaussian
anti-aliasing, crops to the brain's bounding box (plus a margin), stores int16 in RAS orientation,
gzips with a fixed timestamp (so the bytes, and the SHA-256, are reproducible) and records the
file's SHA-256 in samples.json.

    PYTHONPATH=. python Resources/SampleData/make_sample.py
"""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

HERE = Path(__file__).resolve().parent
NAME = "MNI152-brain-1.5mm.nii.gz"
SPACING = 1.5
MARGIN_MM = 6.0


def build() -> nib.Nifti1Image:
    from nilearn.datasets import load_mni152_brain_mask, load_mni152_template

    t1 = load_mni152_template(resolution=1)  # float32 in [0, 1], 1 mm, RAS
    mask = load_mni152_brain_mask(resolution=1)
    data = np.asarray(t1.dataobj, dtype=np.float32) * (np.asarray(mask.dataobj) > 0)
    affine = t1.affine.copy()
    zooms = np.array(t1.header.get_zooms()[:3], dtype=float)
    if not np.allclose(affine[:3, :3], np.diag(zooms)):
        raise SystemExit("expected a RAS-aligned template; nilearn changed its file")

    factor = SPACING / zooms
    sigma = np.sqrt(np.maximum(factor**2 - 1.0, 0.0)) / (2 * np.sqrt(2 * np.log(2)))  # FWHM rule
    smooth = ndimage.gaussian_filter(data, sigma, mode="constant")

    # Crop to the brain (plus a margin) on the new grid.
    nz = np.argwhere(data > 0)
    lo_mm = nz.min(0) - MARGIN_MM / zooms
    hi_mm = nz.max(0) + MARGIN_MM / zooms
    shape = np.ceil((hi_mm - lo_mm) / factor).astype(int) + 1
    grid = np.stack(np.meshgrid(*[lo_mm[i] + factor[i] * np.arange(shape[i]) for i in range(3)], indexing="ij"))
    out = ndimage.map_coordinates(smooth, grid, order=1, mode="constant", cval=0.0)

    new_affine = np.eye(4)
    new_affine[:3, :3] = np.diag(zooms * factor)
    new_affine[:3, 3] = affine[:3, :3] @ lo_mm + affine[:3, 3]
    scaled = np.clip(np.round(out / max(out.max(), 1e-6) * 1000.0), 0, 1000).astype(np.int16)
    img = nib.Nifti1Image(scaled, new_affine)
    img.header.set_xyzt_units("mm")
    img.header.set_qform(new_affine, code=1)
    img.header.set_sform(new_affine, code=1)
    img.header["descrip"] = b"MNI ICBM152 2009a brain, 1.5mm (BrainID sample)"
    return img


def main() -> None:
    img = build()
    raw = img.to_bytes()
    blob = gzip.compress(raw, compresslevel=9, mtime=0)
    path = HERE / NAME
    path.write_bytes(blob)
    manifest = {
        "samples": [
            {
                "name": "MNI152Brain",
                "title": "MNI ICBM152 2009a T1 brain (1.5 mm, skull-stripped)",
                "filename": NAME,
                "sha256": hashlib.sha256(blob).hexdigest(),
                "size": len(blob),
                "shape": [int(s) for s in img.shape],
                "spacing_mm": [float(z) for z in img.header.get_zooms()[:3]],
                "orientation": "".join(nib.aff2axcodes(img.affine)),
                "modality": "T1w (template average)",
                "licence": "MNI ICBM152 notice (permissive, keep the copyright notice): see LICENSE-MNI152.txt",
                "made_by": "Resources/SampleData/make_sample.py from nilearn's packaged mni_icbm152_t1_tal_nlin_sym_09a",
            }
        ]
    }
    (HERE / "samples.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(f"{path} {img.shape} {len(blob) / 1e6:.2f} MB sha256={manifest['samples'][0]['sha256']}")


if __name__ == "__main__":
    main()
