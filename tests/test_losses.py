"""Losses: the batched Lovasz hinge against a per-image loop written from Berman's formula,
plus BCE, soft Dice, focal, the presence BCE, weighted sums and the by-name builder."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_ptx.losses import (
    LOSSES,
    ComboLoss,
    FocalLoss,
    PresenceBCELoss,
    SoftDiceLoss,
    SymmetricLovaszLoss,
    bce,
    build_loss,
    focal,
    lovasz_hinge,
    presence_bce,
    presence_targets,
    soft_dice_loss,
    symmetric_lovasz,
)

# ------------------------------------------------------------------------ the reference


def reference_hinge_one_image(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Berman et al.'s binary Lovasz hinge of one flattened image, step by step."""
    errors = 1.0 - z * (2.0 * y - 1.0)
    errors_sorted, order = torch.sort(errors, descending=True)
    y_sorted = y[order]
    n_true = y_sorted.sum()
    intersection = n_true - torch.cumsum(y_sorted, 0)
    union = n_true + torch.cumsum(1.0 - y_sorted, 0)
    jaccard = 1.0 - intersection / union
    gradient = torch.cat([jaccard[:1], jaccard[1:] - jaccard[:-1]])
    return torch.dot(F.relu(errors_sorted), gradient)


def reference_lovasz(
    z: torch.Tensor, y: torch.Tensor, per_image: bool = True, symmetric: bool = False
) -> torch.Tensor:
    z, y = z.reshape(len(z), -1), y.reshape(len(y), -1).to(z.dtype)
    if not per_image:
        z, y = z.reshape(1, -1), y.reshape(1, -1)

    def mean_over_images(z, y):
        return torch.stack(
            [reference_hinge_one_image(a, b) for a, b in zip(z, y, strict=True)]
        ).mean()

    if symmetric:
        return 0.5 * (mean_over_images(z, y) + mean_over_images(-z, 1.0 - y))
    return mean_over_images(z, y)


def make_targets(kind: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "random":
        return (torch.rand(shape, generator=generator) < 0.3).to(dtype)
    if kind == "empty":
        return torch.zeros(shape, dtype=dtype)
    if kind == "full":
        return torch.ones(shape, dtype=dtype)
    if kind == "single":
        y = torch.zeros(shape, dtype=dtype)
        y[..., 3, 5] = 1
        return y
    # mixed: an empty, a full, a single-pixel and a random image in one batch
    y = (torch.rand(shape, generator=generator) < 0.3).to(dtype)
    y[0], y[1], y[2] = 0, 1, 0
    y[2, ..., 2, 1] = 1
    return y


TOLERANCES = {
    torch.float32: dict(rtol=2e-5, atol=2e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-14),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["random", "empty", "full", "single", "mixed"])
@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("symmetric", [False, True])
def test_lovasz_matches_reference_values_and_gradients(dtype, kind, per_image, symmetric):
    shape = (4, 1, 12, 10)
    z = torch.randn(shape, generator=torch.Generator().manual_seed(0), dtype=dtype) * 2
    y = make_targets(kind, shape, dtype)
    ours_z, reference_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    loss_fn = symmetric_lovasz if symmetric else lovasz_hinge
    ours = loss_fn(ours_z, y, per_image=per_image)
    reference = reference_lovasz(reference_z, y, per_image, symmetric)
    ours.backward()
    reference.backward()
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, reference, **TOLERANCES[dtype])
    torch.testing.assert_close(ours_z.grad, reference_z.grad, **TOLERANCES[dtype])


def test_lovasz_matches_reference_on_large_images_with_trained_like_logits():
    """Most errors negative (the truncated sort does real work), a 64² blob per positive."""
    generator = torch.Generator().manual_seed(2)
    y = torch.zeros(6, 64, 64, dtype=torch.float64)
    y[0, 10:30, 20:44] = 1
    y[3, 40:60, 5:15] = 1
    z = 4 * (2 * y - 1) + 2 * torch.randn(y.shape, generator=generator, dtype=torch.float64)
    assert ((1 - z * (2 * y - 1)) > 0).double().mean() < 0.2
    ours_z, reference_z = z.clone().requires_grad_(), z.clone().requires_grad_()
    symmetric_lovasz(ours_z, y).backward()
    reference_lovasz(reference_z, y, symmetric=True).backward()
    torch.testing.assert_close(ours_z.grad, reference_z.grad, rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(
        symmetric_lovasz(z, y), reference_lovasz(z, y, symmetric=True), rtol=1e-12, atol=0
    )


def test_lovasz_backward_passes_gradcheck():
    z = torch.randn(3, 1, 5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    y = make_targets("mixed", z.shape, torch.float64)
    z.requires_grad_()
    assert torch.autograd.gradcheck(lambda t: symmetric_lovasz(t, y), (z,))
    assert torch.autograd.gradcheck(lambda t: lovasz_hinge(t, y, per_image=False), (z,))


def test_empty_mask_identities():
    """y ≡ 0: hinge(z, y) = relu(1 + max z) per image and hinge(−z, 1 − y) = mean relu(1 + z)."""
    z = torch.randn(3, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    empty = torch.zeros_like(z)
    first_term = F.relu(1 + z.flatten(1).amax(1)).mean()
    second_term = F.relu(1 + z).flatten(1).mean(1).mean()
    torch.testing.assert_close(lovasz_hinge(z, empty), first_term)
    torch.testing.assert_close(lovasz_hinge(-z, 1 - empty), second_term)
    torch.testing.assert_close(symmetric_lovasz(z, empty), 0.5 * (first_term + second_term))
    # full mask: the mean hinge of every pixel
    torch.testing.assert_close(lovasz_hinge(z, 1 - empty), F.relu(1 - z).flatten(1).mean(1).mean())


def test_plain_hinge_on_an_empty_mask_only_moves_the_top_pixel():
    z = torch.randn(1, 8, 8, generator=torch.Generator().manual_seed(5)).requires_grad_()
    lovasz_hinge(z, torch.zeros_like(z)).backward()
    assert torch.count_nonzero(z.grad) == 1
    assert z.grad.flatten()[z.detach().flatten().argmax()] == 1


def test_lovasz_is_zero_with_zero_gradient_when_every_margin_holds():
    y = make_targets("random", (2, 8, 8), torch.float32)
    z = (3 * (2 * y - 1)).requires_grad_()  # every error 1 − 3 < 0
    loss = symmetric_lovasz(z, y)
    loss.backward()
    assert loss.item() == 0
    assert torch.count_nonzero(z.grad) == 0


def test_lovasz_on_tied_logits_matches_reference_value():
    y = make_targets("mixed", (4, 1, 6, 6), torch.float64)
    z = torch.zeros_like(y)  # every error is 1: one big tie
    torch.testing.assert_close(
        symmetric_lovasz(z, y), reference_lovasz(z, y, symmetric=True), rtol=1e-12, atol=0
    )


def test_lovasz_propagates_nan():
    z = torch.zeros(2, 4, 4)
    z[1, 2, 2] = float("nan")
    assert torch.isnan(symmetric_lovasz(z, torch.zeros_like(z)))
    assert torch.isnan(lovasz_hinge(z, torch.ones_like(z)))


def test_lovasz_computes_half_precision_logits_in_float32():
    y = make_targets("random", (2, 1, 8, 8), torch.float32)
    z = torch.randn(y.shape, generator=torch.Generator().manual_seed(6)).half()
    loss = symmetric_lovasz(z, y)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, symmetric_lovasz(z.float(), y))


def test_losses_accept_both_layouts_and_refuse_mismatches():
    y = make_targets("random", (2, 8, 8), torch.float32)
    z = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(7))
    for fn in (symmetric_lovasz, lovasz_hinge, bce, soft_dice_loss, focal):
        flat = fn(z, y)
        torch.testing.assert_close(fn(z[:, None], y[:, None]), flat)
        torch.testing.assert_close(fn(z[:, None], y), flat)
        with pytest.raises(ValueError, match="do not match"):
            fn(z, y[:, :4])
    with pytest.raises(ValueError, match=r"\[B, H, W\] or \[B, 1, H, W\]"):
        symmetric_lovasz(z[:, None].expand(2, 3, 8, 8), y)


# ----------------------------------------------------------------- BCE, Dice, focal, presence


def test_bce_and_focal_formulas():
    y = make_targets("random", (2, 8, 8), torch.float64)
    z = torch.randn(y.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(bce(z, y), F.binary_cross_entropy_with_logits(z, y))
    torch.testing.assert_close(focal(z, y, gamma=0.0), bce(z, y))
    p = torch.sigmoid(z)
    p_true = torch.where(y > 0, p, 1 - p)
    alpha_t = torch.where(y > 0, 0.25, 0.75)
    expected = (-alpha_t * (1 - p_true) ** 2 * torch.log(p_true)).mean()
    torch.testing.assert_close(focal(z, y, gamma=2.0, alpha=0.25), expected)


def test_focal_down_weights_easy_pixels():
    y = torch.tensor([[[1.0, 0.0]]])
    easy, hard = torch.tensor([[[4.0, -4.0]]]), torch.tensor([[[-1.0, 1.0]]])
    assert focal(easy, y) / bce(easy, y) < 0.01
    assert focal(hard, y) / bce(hard, y) > 0.5


def test_soft_dice_per_image_and_empty_masks():
    y = torch.zeros(2, 8, 8)
    y[0, 2:6, 2:6] = 1
    confident = 20 * (2 * y - 1)
    assert soft_dice_loss(confident, y).item() == pytest.approx(0, abs=1e-6)
    # an empty mask: 0 for a background prediction, S/(S + 1) with S = Σp otherwise
    empty = torch.zeros(1, 8, 8)
    assert soft_dice_loss(torch.full((1, 8, 8), -20.0), empty).item() == pytest.approx(0, abs=1e-6)
    z = torch.zeros(1, 8, 8, requires_grad=True)  # p = 0.5 everywhere, S = 32
    loss = soft_dice_loss(z, empty)
    assert loss.item() == pytest.approx(32 / 33)
    loss.backward()
    assert torch.isfinite(z.grad).all() and (z.grad > 0).all()  # pushes every logit down


def test_soft_dice_options():
    y = torch.zeros(2, 8, 8)
    y[0, :4] = 1
    z = torch.zeros(2, 8, 8)  # p = 0.5
    per_image = [1 - (2 * 16 + 1) / (32 + 32 + 1), 1 - 1 / (32 + 1)]
    assert soft_dice_loss(z, y).item() == pytest.approx(sum(per_image) / 2)
    assert soft_dice_loss(z, y, positives_only=True).item() == pytest.approx(per_image[0])
    batch = 1 - (2 * 16 + 1) / (64 + 32 + 1)
    assert soft_dice_loss(z, y, per_image=False).item() == pytest.approx(batch)
    assert soft_dice_loss(z, torch.zeros_like(y), positives_only=True).item() == 0
    with pytest.raises(ValueError, match="smooth"):
        soft_dice_loss(z, y, smooth=0)


def test_presence_bce_from_masks_or_labels():
    masks = torch.zeros(3, 1, 4, 4)
    masks[1, 0, 2, 2] = 1
    assert presence_targets(masks).tolist() == [[0.0], [1.0], [0.0]]
    logits = torch.tensor([[-2.0], [3.0], [0.5]])
    expected = F.binary_cross_entropy_with_logits(logits, torch.tensor([[0.0], [1.0], [0.0]]))
    torch.testing.assert_close(presence_bce(logits, masks), expected)
    torch.testing.assert_close(presence_bce(logits[:, 0], torch.tensor([0, 1, 0])), expected)
    with pytest.raises(ValueError, match="2 presence targets for 3"):
        presence_bce(logits, torch.tensor([0.0, 1.0]))


# ------------------------------------------------------------ modules, combos and the builder


def test_modules_take_model_tuples():
    masks = make_targets("mixed", (4, 1, 8, 8), torch.float32)
    z = torch.randn(masks.shape, generator=torch.Generator().manual_seed(9))
    presence = torch.randn(4, 1, generator=torch.Generator().manual_seed(10))
    lovasz = SymmetricLovaszLoss()
    assert lovasz((z, presence), masks) == lovasz(z, masks) == symmetric_lovasz(z, masks)
    assert PresenceBCELoss()((z, presence), masks) == presence_bce(presence, masks)
    with pytest.raises(ValueError, match="presence_head=True"):
        PresenceBCELoss()(z, masks)


def test_combo_loss_is_the_weighted_sum():
    masks = make_targets("mixed", (4, 1, 8, 8), torch.float64)
    z = torch.randn(masks.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    presence = torch.randn(4, 1, dtype=torch.float64)
    combo = ComboLoss(
        {
            "bce": 3,
            "dice": {"weight": 1, "positives_only": True},
            "focal": {"weight": 4, "gamma": 3.0},
            "presence_bce": 0.5,
        }
    )
    expected = (
        3 * bce(z, masks)
        + soft_dice_loss(z, masks, positives_only=True)
        + 4 * focal(z, masks, gamma=3.0)
        + 0.5 * presence_bce(presence, masks)
    )
    torch.testing.assert_close(combo((z, presence), masks), expected)
    assert set(combo.components((z, presence), masks)) == {"bce", "dice", "focal", "presence_bce"}
    assert isinstance(combo.terms["focal"], FocalLoss) and combo.terms["focal"].gamma == 3.0
    assert isinstance(combo.terms["dice"], SoftDiceLoss) and combo.terms["dice"].positives_only


def test_build_loss_names_and_errors():
    masks = make_targets("mixed", (4, 1, 8, 8), torch.float32)
    z = torch.randn(masks.shape, generator=torch.Generator().manual_seed(12))
    for name in LOSSES.keys() - {"presence_bce"}:
        loss = build_loss(name)
        assert isinstance(loss, torch.nn.Module) and loss(z, masks).ndim == 0
    torch.testing.assert_close(
        build_loss("bce_dice")(z, masks), bce(z, masks) + soft_dice_loss(z, masks)
    )
    torch.testing.assert_close(build_loss("symmetric_lovasz")(z, masks), symmetric_lovasz(z, masks))
    torch.testing.assert_close(
        build_loss({"lovasz": 2})(z, masks), 2 * lovasz_hinge(z, masks), rtol=1e-6, atol=0
    )
    with pytest.raises(ValueError, match="unknown loss 'dise'.*bce_dice"):
        build_loss("dise")
    with pytest.raises(ValueError, match="unknown loss 'lovaz'"):
        build_loss({"lovaz": 1})
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        build_loss({"bce": -1})
    with pytest.raises(ValueError, match=r"loss 'focal': unknown option\(s\) \['gama'\]"):
        build_loss({"focal": {"weight": 1, "gama": 2}})
    with pytest.raises(ValueError, match="at least one term"):
        build_loss({})


# ----------------------------------------------------- pixels left out (``valid``)


@pytest.mark.parametrize("name", ["lovasz_hinge", "symmetric_lovasz"])
@pytest.mark.parametrize("per_image", [True, False])
def test_lovasz_with_valid_equals_the_loss_of_the_kept_pixels(name: str, per_image: bool) -> None:
    from ssl_ptx import losses

    function = getattr(losses, name)
    generator = torch.Generator().manual_seed(3)
    logits = torch.randn(3, 1, 8, 8, generator=generator, dtype=torch.float64)
    targets = (torch.rand(3, 1, 8, 8, generator=generator) > 0.6).double()
    targets[1] = 0  # an empty mask
    valid = torch.rand(3, 1, 8, 8, generator=generator) > 0.3
    logits.requires_grad_(True)
    loss = function(logits, targets, per_image=per_image, valid=valid)
    loss.backward()
    # reference: the same loss on the kept pixels alone, image by image (or as one row)
    kept = [(logits[i][valid[i]], targets[i][valid[i]]) for i in range(3)]
    if per_image:
        expected = torch.stack(
            [function(z.view(1, 1, -1), y.view(1, 1, -1)) for z, y in kept]
        ).mean()
    else:
        z = torch.cat([z for z, _ in kept])
        y = torch.cat([y for _, y in kept])
        expected = function(z.view(1, 1, -1), y.view(1, 1, -1), per_image=False)
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), abs=1e-12)
    assert (logits.grad[~valid] == 0).all() and logits.grad[valid].abs().sum() > 0


def test_bce_with_valid_is_the_mean_over_kept_pixels() -> None:
    from ssl_ptx.losses import bce

    logits = torch.tensor([[[[2.0, -1.0], [0.5, 3.0]]]])
    targets = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    valid = torch.tensor([[[[True, False], [True, False]]]])
    expected = torch.nn.functional.binary_cross_entropy_with_logits(
        torch.tensor([2.0, 0.5]), torch.tensor([1.0, 0.0])
    )
    assert float(bce(logits, targets, valid)) == pytest.approx(float(expected))


def test_trainer_leaves_ignored_pixels_out_and_refuses_losses_that_cannot(tmp_path) -> None:
    from ssl_ptx.config import TrainerConfig
    from ssl_ptx.engine import Trainer
    from ssl_ptx.losses import IGNORE_TARGET, FocalLoss, SymmetricLovaszLoss

    model = torch.nn.Conv2d(1, 1, 1)
    logits = torch.randn(2, 1, 6, 6)
    masks = (torch.rand(2, 1, 6, 6) > 0.5).float()
    band = torch.zeros_like(masks, dtype=torch.bool)
    band[:, :, :2] = True
    batch = {"mask": masks.masked_fill(band, IGNORE_TARGET)}
    config = TrainerConfig(device="cpu", progress=False)
    trainer = Trainer(
        model, SymmetricLovaszLoss(), config, out_dir=tmp_path, default_callbacks=False
    )
    loss, _ = trainer.compute_loss(logits, batch)
    expected = symmetric_lovasz(logits, masks, valid=~band)
    assert float(loss) == pytest.approx(float(expected), abs=1e-6)
    assert float(loss) != pytest.approx(float(symmetric_lovasz(logits, masks)), abs=1e-6)
    refusing = Trainer(model, FocalLoss(), config, out_dir=tmp_path, default_callbacks=False)
    with pytest.raises(ValueError, match="cannot leave pixels out"):
        refusing.compute_loss(logits, batch)
