"""model/preview.py: the one slice preview (training previews, evaluation montages, result previews)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from model.preview import display_planes, montage_png


def test_planes_are_neurological_with_anterior_and_superior_up() -> None:
    v = np.zeros((6, 8, 10), np.float32)  # (z: I->S, y: P->A, x: L->R)
    v[3, 7, 9] = 1.0  # in the middle axial slice: most anterior, most right
    v[5, 4, 0] = 2.0  # in the middle coronal slice: most superior, most left
    axial, coronal, sagittal = display_planes(v)
    assert axial.shape == (8, 10) and coronal.shape == (6, 10) and sagittal.shape == (6, 8)
    assert axial[0, 9] == 1.0  # anterior up, right on the right
    assert coronal[0, 0] == 2.0  # superior up, left on the left
    v[5, 7, 5] = 3.0  # in the middle sagittal slice: superior and anterior
    assert display_planes(v)[2][0, 7] == 3.0  # superior up, anterior on the right
    assert display_planes(np.eye(3))[0][0, 2] == 1.0  # a 2D image is flipped the same way
    with pytest.raises(ValueError, match="2D or 3D"):
        display_planes(np.zeros((2, 2, 2, 2)))


def test_montage_has_a_row_per_volume_and_is_written_whole(tmp_path: Path) -> None:
    vols = np.full((4, 16, 16, 16), -1.0, np.float32)
    vols[2] = 1.0  # the third row is white
    out = montage_png(vols, tmp_path / "p" / "m.png", min_tile=32)
    img = np.asarray(Image.open(out))
    # tiles scaled x2 to 32 px, 2 px apart: 4 rows and 3 columns
    assert img.shape == (4 * 34 - 2, 3 * 34 - 2)
    row = img[2 * 34 : 2 * 34 + 32]
    assert all(row[:, c * 34 : c * 34 + 32].min() == 255 for c in range(3)) and img[:32].max() == 0
    assert row[:, 32:34].max() == 0  # the gap between tiles
    assert [p.name for p in out.parent.iterdir()] == ["m.png"]  # no temporary file left
