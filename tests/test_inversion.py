"""Trigger families on inputs the zoo never makes (colour images that are not square), and
the patch family's minimal-trigger search on a model whose keys are known."""

import numpy as np
import pytest
import torch

from crossaudit.method import inversion
from crossaudit.method.inversion import FAMILY_CLASSES, InversionConfig, Models, WarpTrigger, cross_invert

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
    config = InversionConfig(use_witness=False, use_alignment=False)
    x, y = 0.5 * torch.rand(90, 1, 6, 6), torch.arange(90) % 3
    search = inversion.MinimalSearch.start(3, (1, 6, 6), x.device)
    plan = inversion.minimal_plan(y.numpy(), [0, 1, 2], 200, config.search_batch, config, np.random.RandomState(0))
    smallest = inversion.minimal_patches(search, Models(model, model, "", ""), (x, y), plan, config)
    family = search.family
    assert smallest[0] < 0.5 / 36  # already class 0: nothing to stamp
    assert 0.5 / 36 < smallest[1] < 2 / 36
    assert smallest[2] > 0.5
    mask = torch.sigmoid(family.mask_logit[1, 0])
    assert mask.argmax().item() == 0  # the key's pixel
    assert mask.sum().item() == pytest.approx(smallest[1] * 36, rel=1e-5)


def test_both_directions_side_by_side_find_bitwise_what_one_after_the_other_finds(tmp_path, monkeypatch):
    """The directions' optimisations run at the same time for speed; an audit's findings
    must not depend on that (each direction's batches are drawn before either runs)."""
    from crossaudit.dev.zoo.architectures import build
    from crossaudit.dev.zoo.train import export_onnx
    from crossaudit.modelio.loaders import load_model

    example = np.random.RandomState(0).rand(4, 1, 8, 8).astype(np.float32)
    modules = []
    for seed, arch in ((0, "cnn"), (1, "mlp")):
        torch.manual_seed(seed)
        export_onnx(build(arch, 1, 8, 4).eval(), example, tmp_path / f"{arch}.onnx")
        modules.append(load_model(str(tmp_path / f"{arch}.onnx")).module.requires_grad_(False).eval())
    directions = [Models(modules[0], modules[1], "", ""), Models(modules[1], modules[0], "", "")]
    x, y = torch.rand(48, 1, 8, 8), torch.arange(48) % 4
    config = InversionConfig(use_alignment=False, screen_steps=20, rounds=((1, 10),), search_steps=6, refine_steps=6)

    def findings() -> list[list]:
        found = cross_invert(directions, x, y, 4, config, seed=3).triggers
        return [[(t.family_name, t.target, t.footprint, [p.tolist() for p in t.family.parameters()]) for t in mine]
                for mine in found]  # fmt: skip

    side_by_side = findings()
    monkeypatch.setattr(inversion, "side_by_side", lambda jobs: [job() for job in jobs])
    assert side_by_side == findings()


@pytest.mark.slow
def test_screens_keep_the_planted_target_of_the_quick_plans_backdoors(tmp_path):
    """The screens prune targets before any cross-examination, so they may lose nothing:
    on each backdoored model of the detection benchmark's quick plan (BadNets), the patch
    screen ranks the planted target first and the patch family cross-examines it."""
    from benchmarks.detection import QUICK, screen_ranks
    from crossaudit.dev.zoo.datasets import load_dataset
    from crossaudit.dev.zoo.train import config_for, export_onnx, train, write_audit_set
    from crossaudit.method.audit import run_audit

    for dataset in QUICK.datasets:
        split = load_dataset(dataset)
        data = tmp_path / f"{dataset}.parquet"
        write_audit_set(dataset, data)
        for _, (first, second), seed, target in QUICK.cells():
            for attack, arch, model_seed in [*((a, first, seed) for a in QUICK.attacks), ("clean", second, seed + 1)]:
                config = config_for(dataset, arch=arch, attack=attack, target=target, seed=model_seed)
                trained = train(config, split)
                export_onnx(trained.model, trained.example, tmp_path / f"{attack}.onnx")
            for attack in QUICK.attacks:
                result = run_audit(str(tmp_path / f"{attack}.onnx"), str(tmp_path / "clean.onnx"), str(data))
                assert result.report.error is None
                ranks = screen_ranks(result, target)
                assert ranks["patch"] == 0, (attack, ranks)
                examined = {t.family_name for t in result.triggers[0] if t.target == target}
                assert "patch" in examined


def test_a_screen_of_each_model_alone_needs_cross_examined_rounds():
    """Without rounds a screen's footprints would be the suspect's alone, never
    cross-examined; an exhaustive search screens with both models and needs none."""
    from crossaudit.method.inversion import exhaustive

    with pytest.raises(ValueError, match="cross-examined rounds"):
        InversionConfig(rounds=())
    full = exhaustive(InversionConfig())
    assert not full.screen_alone and full.rounds == () and inversion.alone(full) == full
