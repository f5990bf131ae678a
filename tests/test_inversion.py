"""Trigger families on inputs the zoo never makes (colour images that are not square), and
the patch family's minimal-trigger search on a model whose keys are known."""

import numpy as np
import pytest
import torch

from crossaudit.inversion import FAMILY_CLASSES, InversionConfig, Models, PatchTrigger, WarpTrigger, minimal_patches

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


class _OnePixelKey(torch.nn.Module):
    """Class 0 unless pixel (0, 0) is near white (class 1, a one-pixel backdoor) or the
    whole image is (class 2, a target that takes the whole image)."""

    def forward(self, x):
        zero = torch.zeros(len(x))
        return torch.stack([zero, 20 * (x[:, 0, 0, 0] - 0.8), 20 * (x.flatten(1).mean(1) - 0.9)], dim=1)

    def forward_tapped(self, x, taps):
        return self(x), {}


def test_minimal_patches_finds_each_targets_smallest_trigger():
    """The one-pixel key is found at about one pixel, the whole-image target at most of
    the image, and the family keeps the smallest patch that worked."""
    torch.manual_seed(0)
    model = _OnePixelKey()
    config = InversionConfig(use_witness=False, use_alignment=False, minimal_steps=200)
    family = PatchTrigger(3, (1, 6, 6))
    x, y = 0.5 * torch.rand(90, 1, 6, 6), torch.arange(90) % 3
    smallest = minimal_patches(family, Models(model, model, "", ""), (x, y), config, np.random.RandomState(0))
    assert smallest[0] < 0.5 / 36  # already class 0: nothing to stamp
    assert 0.5 / 36 < smallest[1] < 2 / 36
    assert smallest[2] > 0.5
    mask = torch.sigmoid(family.mask_logit[1, 0])
    assert mask.argmax().item() == 0  # the key's pixel
    assert mask.sum().item() == pytest.approx(smallest[1] * 36, rel=1e-5)
