"""The one grid-to-grid resampler (model/data/grid.py) that training, serving and the metrics use."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from model.data.grid import grid_spacing, resample, volume_to_grid


def test_whole_factor_shrink_is_average_pooling_and_same_shape_is_the_input() -> None:
    x = torch.randn(2, 1, 8, 8, 8)
    assert resample(x, (8, 8, 8)) is x
    assert torch.equal(resample(x, (4, 2, 8)), F.avg_pool3d(x, (2, 4, 1)))
    assert torch.equal(resample(x[:, :, 0], (4, 4)), F.avg_pool2d(x[:, :, 0], 2))


def test_a_fractional_shrink_averages_instead_of_aliasing() -> None:
    # the finest checkerboard (period 2 voxels) has nothing a coarser grid can show: averaging
    # leaves at most 1/27 of it (windows of 3 voxels on every axis), linear interpolation 1/8
    i = torch.arange(12)
    board = ((-1.0) ** (i[:, None, None] + i[None, :, None] + i[None, None, :])).float()[None, None]
    shrunk = resample(board, (8, 8, 8))
    assert shrunk.shape == (1, 1, 8, 8, 8)
    assert shrunk.abs().max() <= 1 / 27 + 1e-6
    linear = F.interpolate(board, size=(8, 8, 8), mode="trilinear", align_corners=False)
    assert linear.abs().max() >= 0.125 - 1e-6
    const = torch.full((1, 1, 12, 10, 9), 0.25)
    torch.testing.assert_close(resample(const, (8, 7, 5)), torch.full((1, 1, 8, 7, 5), 0.25))


def test_growing_any_axis_interpolates_linearly() -> None:
    x = torch.randn(1, 1, 4, 8, 8)
    expect = F.interpolate(x, size=(8, 4, 8), mode="trilinear", align_corners=False)
    torch.testing.assert_close(resample(x, (8, 4, 8)), expect, rtol=0, atol=0)


def test_refuses_a_grid_of_another_dimension() -> None:
    with pytest.raises(ValueError, match="cannot resample a 3D grid"):
        resample(torch.zeros(1, 1, 4, 4, 4), (4, 4))


def test_volume_to_grid_and_its_spacing_keep_the_field_of_view() -> None:
    v = torch.linspace(-1.5, 1.5, 16**3).reshape(16, 16, 16).numpy()
    g = volume_to_grid(v, (8, 4, 4))
    assert g.shape == (8, 4, 4) and g.dtype.name == "float32" and g.min() >= -1 and g.max() <= 1
    # 16 voxels of 1.5 mm along z become 8 of 3 mm, 16 of 1 mm along x and y become 4 of 4 mm
    assert grid_spacing((1.0, 1.0, 1.5), 16, (8, 4, 4)) == (4.0, 4.0, 3.0)
