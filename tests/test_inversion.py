"""Trigger families on inputs the zoo never makes: colour images that are not square."""

import pytest
import torch

from crossaudit.inversion import FAMILY_CLASSES, WarpTrigger

SHAPE = (3, 12, 10)  # C x H x W: colour, taller than wide


@pytest.mark.parametrize("name", sorted(FAMILY_CLASSES))
def test_every_family_stamps_non_square_colour_images(name):
    torch.manual_seed(0)
    family = FAMILY_CLASSES[name](4, SHAPE)
    x = torch.rand(6, *SHAPE)
    which = torch.tensor([0, 1, 2, 3, 0, 1])
    stamped = family(x, which)
    assert stamped.shape == x.shape
    assert family.footprint(which).shape == (6,)
    stamped.sum().backward()  # the inversion needs gradients through every family


def test_warp_moves_along_each_axis_by_its_own_side():
    """A displacement of one pixel along x shifts columns by one, along y rows by one,
    and its footprint is that pixel as a fraction of the side it runs along."""
    warp = WarpTrigger(2, SHAPE)
    with torch.no_grad():
        warp.flow_raw.zero_()
        one_pixel = torch.atanh(torch.tensor(1.0 / warp.max_pixels))
        warp.flow_raw[0, 0] = one_pixel  # target 0: x
        warp.flow_raw[1, 1] = one_pixel  # target 1: y
    x = torch.rand(2, *SHAPE)
    with torch.no_grad():
        moved = warp(x, torch.tensor([0, 1]))
        footprint = warp.footprint(torch.tensor([0, 1]))
    assert torch.allclose(moved[0, :, :, :-1], x[0, :, :, 1:], atol=1e-5)
    assert torch.allclose(moved[1, :, :-1, :], x[1, :, 1:, :], atol=1e-5)
    assert footprint[0].item() == pytest.approx(0.5 / SHAPE[2], rel=1e-4)
    assert footprint[1].item() == pytest.approx(0.5 / SHAPE[1], rel=1e-4)
