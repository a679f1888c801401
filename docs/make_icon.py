"""Draw BrainID/Resources/Icons/BrainID.png (128x128): a stylised axial brain slice in FreeSurfer colours.

    PYTHONPATH=. python docs/make_icon.py
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "BrainID" / "Resources" / "Icons" / "BrainID.png"


def main():
    n = 128
    y, x = np.mgrid[-1:1:n * 1j, -1:1:n * 1j]
    r = np.sqrt((x / 0.78) ** 2 + (y / 0.92) ** 2)
    wobble = 0.04 * np.sin(14 * np.arctan2(y, x))
    lab = np.zeros((n, n), int)
    lab[r < 0.95 + wobble] = 1  # cortex
    lab[r < 0.78 + wobble * 0.6] = 2  # white matter
    ventricles = (np.abs(x) > 0.05) & (np.abs(x) < 0.2) & (np.abs(y + 0.05) < 0.3)
    lab[ventricles & (r < 0.7)] = 3
    lab[(np.abs(x) < 0.03) & (r < 0.95)] = 0  # midline
    deep = (np.sqrt(((np.abs(x) - 0.33) / 0.12) ** 2 + ((y - 0.05) / 0.2) ** 2) < 1)
    lab[deep] = 4
    colors = np.array([[0, 0, 0, 0], [205, 62, 78, 255], [245, 245, 245, 255], [120, 18, 134, 255],
                       [0, 118, 14, 255]]) / 255.0
    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes([0, 0, 1, 1])
    ax.imshow(lab, cmap=ListedColormap(colors), vmin=0, vmax=4, interpolation="nearest")
    ax.axis("off")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, transparent=True)
    print(OUT)


if __name__ == "__main__":
    main()
