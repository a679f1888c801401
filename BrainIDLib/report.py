"""A one-file HTML report of a prediction, for people who run BrainID without a viewer.

Three-plane montages of the input with the segmentation overlaid and of the QC uncertainty map,
the volumes table coloured by QC score, and the model with its known limits. Images are PNGs
encoded here (numpy + zlib, no plotting library) and inlined as data: URIs, so the page is a single
file that opens offline in any browser.
"""

from __future__ import annotations

import base64
import datetime
import html
import os
import struct
import zlib
from pathlib import Path

import numpy as np

from .files import atomic_write
from .labels import label_color
from .qc import FLAG_BELOW, GOOD_FROM
from .volumes import volumes_table

PLANE_PIXELS = 300  # longest side of one plane in the montage


# ------------------------------------------------------------------------------ PNG
def png_bytes(rgb: np.ndarray) -> bytes:
    """(H, W, 3) uint8 -> PNG file bytes (8-bit RGB, no filtering)."""
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w, _ = rgb.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), rgb.reshape(h, w * 3)], axis=1).tobytes()

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b"")


def _data_uri(rgb: np.ndarray) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(rgb)).decode("ascii")


# ------------------------------------------------------------------------------ slices
def _canonical(img) -> tuple[np.ndarray, np.ndarray]:
    """(array in RAS voxel order, voxel sizes) of a nibabel image."""
    import nibabel as nib

    c = nib.as_closest_canonical(img)
    return np.asanyarray(c.dataobj), np.asarray(c.header.get_zooms()[:3], dtype=float)


def _plane(vol: np.ndarray, spacing: np.ndarray, axis: int, index: int) -> np.ndarray:
    """A slice shown radiologically-upright (superior / anterior at the top) with square pixels,
    nearest-neighbour resampled so its longest side is PLANE_PIXELS."""
    sl = np.take(vol, index, axis=axis)
    sp = np.delete(spacing, axis)
    extent = np.array(sl.shape) * sp
    scale = PLANE_PIXELS / extent.max()
    size = np.maximum(1, np.round(extent * scale)).astype(int)
    rows = np.minimum((np.arange(size[0]) + 0.5) / scale / sp[0], sl.shape[0] - 1).astype(int)
    cols = np.minimum((np.arange(size[1]) + 0.5) / scale / sp[1], sl.shape[1] - 1).astype(int)
    return np.flipud(sl[np.ix_(rows, cols)].T)  # (second axis up, first axis right)


def _grey(a: np.ndarray, lo: float, hi: float) -> np.ndarray:
    g = np.clip((a.astype(np.float32) - lo) / max(hi - lo, 1e-6), 0, 1)
    return np.repeat(g[..., None], 3, -1)


def _label_rgb(ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rgb = np.zeros(ids.shape + (3,), np.float32)
    for lab in np.unique(ids):
        if lab:
            rgb[ids == lab] = np.array(label_color(int(lab)), np.float32) / 255.0
    return rgb, ids > 0


def _heat(u: np.ndarray) -> np.ndarray:
    """0 -> transparent black, 1 -> white through red and yellow."""
    u = np.clip(u, 0, 1)[..., None]
    return np.clip(np.concatenate([3 * u, 3 * u - 1, 3 * u - 2], -1), 0, 1)


def montage(image, overlay=None, kind: str = "labels", centre=None, heat_max: float = 1.0) -> np.ndarray:
    """(H, W, 3) uint8: axial, coronal and sagittal planes through `centre` (RAS voxel indices,
    default the middle), the image in grey with `overlay` (labels, or with kind="heat" a map shown
    from transparent at 0 to white at `heat_max`)."""
    vol, spacing = _canonical(image)
    vol = vol.astype(np.float32)
    lo, hi = np.percentile(vol, (0.5, 99.5))
    over = _canonical(overlay)[0] if overlay is not None else None
    centre = [s // 2 for s in vol.shape] if centre is None else centre
    planes = []
    for axis in (2, 1, 0):  # axial, coronal, sagittal
        rgb = _grey(_plane(vol, spacing, axis, centre[axis]), lo, hi)
        if over is not None:
            o = _plane(over, spacing, axis, centre[axis])
            if kind == "heat":
                u = np.clip(o.astype(np.float32) / heat_max, 0, 1)
                alpha = 0.8 * u[..., None]
                rgb = (1 - alpha) * rgb + alpha * _heat(u)
            else:
                colour, mask = _label_rgb(np.rint(o).astype(np.int64))
                rgb[mask] = 0.55 * rgb[mask] + 0.45 * colour[mask]
        planes.append(rgb)
    height = max(p.shape[0] for p in planes)
    gap = np.ones((height, 4, 3), np.float32)
    padded = [np.concatenate([p, np.zeros((height - p.shape[0], p.shape[1], 3), np.float32)]) for p in planes]
    out = np.concatenate([padded[0], gap, padded[1], gap, padded[2]], axis=1)
    return (out * 255 + 0.5).astype(np.uint8)


def _brain_centre(seg) -> list[int] | None:
    """Centre of the labelled voxels (RAS voxel indices), so the planes cut through the brain."""
    ids = _canonical(seg)[0]
    where = np.argwhere(ids > 0)
    return [int(v) for v in np.round(where.mean(0))] if len(where) else None


# ------------------------------------------------------------------------------ HTML
def _qc_class(score: float | None, threshold: float) -> str:
    if score is None:
        return ""
    return "good" if score >= GOOD_FROM else ("fair" if score >= threshold else "low")


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
.meta{color:#555;font-size:13px} img{max-width:100%;image-rendering:pixelated;border:1px solid #ccc}
.score{display:inline-block;padding:6px 12px;border-radius:6px;font-weight:600;font-size:16px}
table{border-collapse:collapse;font-size:13px} td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:right}
td:nth-child(2),th:nth-child(2){text-align:left}
.good{background:#d8f3dc} .fair{background:#fff3bf} .low{background:#ffc9c9} .note{font-size:13px;color:#444}
"""


def render_html(image, input_name: str, pred, model_name: str, model_description: str = "", labels=None) -> str:
    """The report page as one HTML string (see module docs); `image` is the input (nibabel image)."""
    seg = pred.outputs["segmentation"]
    qc = getattr(pred, "qc", None)
    threshold = qc.threshold if qc is not None else FLAG_BELOW
    centre = _brain_centre(seg)
    esc = html.escape
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>BrainID report: {esc(input_name)}</title>"
             f"<style>{STYLE}</style></head><body>",
             f"<h1>BrainID report: {esc(input_name)}</h1>",
             f"<p class='meta'>model <b>{esc(model_name)}</b> &middot; "
             f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC &middot; device {esc(str(pred.device))}</p>"]
    if qc is not None:
        cls = _qc_class(qc.scan_score, threshold)
        flagged = ", ".join(s.name for s in qc.flagged()) or "none"
        parts.append(f"<p><span class='score {cls}'>whole-scan QC {qc.scan_score:.2f}</span> &nbsp; labelled volume "
                     f"{qc.total_volume_ml:.0f} mL &middot; structures below {threshold:g}: {esc(flagged)}</p>")
    parts.append("<h2>Segmentation</h2><p class='note'>Axial, coronal and sagittal planes through the centre of "
                 "the labelled voxels; the patient's right is on the right of the axial and coronal planes "
                 "(neurological convention), anterior on the right of the sagittal one.</p>")
    parts.append(f"<img alt='input' src='{_data_uri(montage(image, centre=centre))}'><br>")
    parts.append(f"<img alt='segmentation overlay' src='{_data_uri(montage(image, seg, centre=centre))}'>")
    unc = getattr(pred, "uncertainty", None)
    if unc is not None:
        u = np.asanyarray(unc.dataobj)
        top = max(0.05, float(np.percentile(u[u > 0], 99))) if (u > 0).any() else 1.0
        parts.append("<h2>Uncertainty</h2><p class='note'>Per-voxel entropy of the class probabilities averaged "
                     "over the base and perturbed passes, divided by its maximum (0 = every pass sure of one class, "
                     f"1 = uniform guess). Colour: transparent at 0, red, yellow, white at {top:.2f} (the 99th "
                     "percentile) and above.</p>"
                     f"<img alt='uncertainty' src='{_data_uri(montage(image, unc, 'heat', centre, top))}'>")
    rows = volumes_table(seg, labels=labels)
    by_label = qc.by_label() if qc is not None else {}
    parts.append("<h2>Structure volumes</h2><table><tr><th>label</th><th>structure</th><th>mL</th>"
                 + ("<th>QC</th>" + "".join(f"<th>{k}</th>" for k in qc.perturbations)
                    + "<th>expected Dice</th><th>volume plausible</th><th>typical Dice</th>" if qc else "")
                 + "</tr>")
    for r in rows:
        s = by_label.get(r.label)
        cells = f"<td>{r.label}</td><td>{esc(r.name)}</td><td>{r.ml:.2f}</td>"
        if s is not None:
            agree = "".join(f"<td>{s.by_perturbation[k]:.2f}</td>" for k in qc.perturbations)
            qc_cell = (f"<td title='not labelled; normal scans may have none'>absent</td>"
                       if s.absent
                       else f"<td class='{_qc_class(s.score, threshold)}'>{s.score:.2f}</td>")
            cells += (f"{qc_cell}{agree}"
                      f"<td>{s.expected_dice:.2f}</td><td>{s.volume_plausibility:.2f}</td>"
                      f"<td>{'-' if s.typical_dice is None else f'{s.typical_dice:.2f}'}</td>")
        parts.append(f"<tr>{cells}</tr>")
    parts.append("</table>")
    if qc is not None:
        parts.append(f"<p class='note'>QC colours: green &ge; {GOOD_FROM:g}, amber &ge; {threshold:g}, red below (flagged). "
                     "QC = sqrt(typical Dice x mean(agreement, expected Dice)) x volume plausibility (without a "
                     f"typical Dice: mean(agreement, expected Dice) x volume plausibility). {' / '.join(qc.perturbations)}: "
                     "Dice between the segmentation and that of the mirrored (flip) or one-voxel-shifted (shift) "
                     "input; expected Dice: soft Dice of the class probabilities against the structure; volume "
                     "plausible: 1 inside the range of training label maps; typical Dice: this model's mean Dice "
                     "for the structure on synthetic scans of its training label maps. absent: not labelled, and "
                     "training label maps may lack it too (a missing structure they always have is scored and "
                     "flagged).</p>")
    parts.append("<h2>Model and known limits</h2>"
                 f"<p class='note'>{esc(model_description or model_name)}</p><ul class='note'>"
                 "<li>QC scores rank results by how much to trust them; they are not Dice values. They were "
                 "calibrated on synthetic scans (see the README's QC section).</li>"
                 "<li>Whole-head (unstripped) scans: extra-cerebral tissue may be labelled as brain; a low whole-scan "
                 "score or a labelled volume far above ~1.5 L points to this.</li>"
                 "<li>Research software, not validated for clinical use.</li></ul></body></html>")
    return "\n".join(parts)


def write_report(path: str | os.PathLike, input_path, pred, model_name: str, model_description: str = "",
                 labels=None) -> Path:
    """Write the report of `pred` (a BrainIDLib.predict result on `input_path`) atomically."""
    import nibabel as nib

    text = render_html(nib.load(str(input_path)), Path(input_path).name, pred, model_name, model_description, labels)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
