"""Masked loss (trainer/data/loss_masks.py and the loss in trainer/training/loop.py): where masks come from, how
they are fitted to the bucket and the latent grid, and the weighted loss, against values computed by hand."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lora_lab.trainer.data.dataset import DatasetError, dataset_from_pixels
from lora_lab.trainer.data.encoded_dataset import encode_dataset
from lora_lab.trainer.data.folder_scan import folder_signature, scan_folder
from lora_lab.trainer.data.loss_masks import MaskedLoss, latent_weights, picture_mask
from lora_lab.trainer.training.loop import TrainSettings, denoising_loss, train
from lora_lab.trainer.training.noise import NoiseSettings
from toy_training import TinyEpsDenoiser, toy_data


def left_half_white(size=(64, 64)) -> Image.Image:
    array = np.zeros((size[1], size[0]), dtype=np.uint8)
    array[:, : size[0] // 2] = 255
    return Image.fromarray(array, mode="L")


def rgba_with_opaque_left_half(path: Path, size=(64, 64)) -> Path:
    array = np.full((size[1], size[0], 4), 120, dtype=np.uint8)
    array[..., 3] = np.asarray(left_half_white(size))
    Image.fromarray(array, mode="RGBA").save(path)
    return path


def test_a_mask_becomes_latent_weights_with_the_floor_outside():
    weights = latent_weights(left_half_white(), (64, 64), (8, 8), floor=0.1)
    assert weights.shape == (8, 8) and weights.dtype == torch.float32
    # Latent pixels wholly inside or outside the white half: exactly 1 and the floor (the seam is 4 | 4 columns).
    assert torch.equal(weights[:, :4], torch.ones(8, 4))
    torch.testing.assert_close(weights[:, 4:], torch.full((8, 4), 0.1), rtol=0, atol=1e-7)


def test_the_mask_is_cropped_to_the_bucket_as_the_picture_is():
    """A 128x64 picture in a 64x64 bucket keeps its centre: the left quarter is cropped away, so a mask white on
    the left half keeps white only on the left half of the kept part."""
    weights = latent_weights(left_half_white((128, 64)), (64, 64), (8, 8), floor=0.0)
    assert torch.equal(weights[:, :4], torch.ones(8, 4)) and torch.equal(weights[:, 4:], torch.zeros(8, 4))


def test_masks_come_from_sidecars_and_transparency_and_are_never_pictures(tmp_path):
    rgba_with_opaque_left_half(tmp_path / "alpha.png")
    Image.new("RGB", (64, 64), (10, 200, 10)).save(tmp_path / "side.png")
    left_half_white().save(tmp_path / "side.mask.png")
    Image.new("RGB", (64, 64), (10, 10, 200)).save(tmp_path / "onetrainer.jpg")
    left_half_white().save(tmp_path / "onetrainer-masklabel.png")
    Image.new("RGB", (64, 64), (200, 10, 10)).save(tmp_path / "plain.png")
    left_half_white().save(tmp_path / "gone.mask.png")
    dataset = scan_folder(str(tmp_path))
    assert [item.key for item in dataset.items] == ["alpha.png", "onetrainer.jpg", "plain.png", "side.png"]
    assert any("1 mask file(s) have no picture" in warning and "gone.mask.png" in warning
               for warning in dataset.warnings)
    sources = {item.key: (picture_mask(dataset, i) or None) for i, item in enumerate(dataset.items)}
    assert {key: mask.source if mask else None for key, mask in sources.items()} == {
        "alpha.png": "alpha channel", "onetrainer.jpg": "mask file", "plain.png": None, "side.png": "mask file"}
    for key in ("alpha.png", "side.png", "onetrainer.jpg"):
        assert np.array_equal(np.asarray(sources[key].image), np.asarray(left_half_white())), key
    # A changed mask file changes the folder's signature: ComfyUI runs the dataset node again.
    before = folder_signature(str(tmp_path))
    Image.new("L", (64, 64), 255).save(tmp_path / "side.mask.png")
    assert folder_signature(str(tmp_path)) != before


def test_a_mask_follows_the_pictures_exif_orientation(tmp_path):
    """A phone picture stored on its side (EXIF 6: turn 90° clockwise) trains upright; its alpha turns with it."""
    path = tmp_path / "turned.png"
    array = np.full((32, 64, 4), 90, dtype=np.uint8)     # stored 64 wide, 32 high
    array[..., 3] = 0
    array[:16, :, 3] = 255                                 # stored top half opaque
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(array, mode="RGBA").save(path, exif=exif)
    dataset = scan_folder(str(tmp_path))
    assert (dataset.items[0].width, dataset.items[0].height) == (32, 64)
    mask = np.asarray(picture_mask(dataset, 0).image)
    assert mask.shape == (64, 32)                          # upright: 32 wide, 64 high
    assert (mask[:, 16:] == 255).all() and (mask[:, :16] == 0).all()     # the top turned to the right


def test_a_mask_file_of_another_size_is_named(tmp_path):
    Image.new("RGB", (64, 48)).save(tmp_path / "a.png")
    Image.new("L", (48, 64), 255).save(tmp_path / "a.mask.png")
    dataset = scan_folder(str(tmp_path))
    with pytest.raises(DatasetError, match=r"a.mask.png is 48x64, but a.png is 64x48"):
        picture_mask(dataset, 0)


def test_an_image_batch_takes_one_mask_each_or_one_for_all():
    pixels = torch.rand(3, 16, 24, 3)
    one = torch.zeros(16, 24)
    one[:, :12] = 1
    dataset = dataset_from_pixels(pixels, ["a"], masks=one)
    assert dataset.masks.shape == (3, 16, 24)
    assert np.array_equal(np.asarray(picture_mask(dataset, 2).image)[:, :12], np.full((16, 12), 255))
    assert dataset.fingerprint() != dataset_from_pixels(pixels, ["a"]).fingerprint()
    assert dataset_from_pixels(pixels, ["a"]).fingerprint() == dataset_from_pixels(pixels, ["a"]).fingerprint()
    with pytest.raises(DatasetError, match="The masks are 2 of 24x16; the pictures are 3 of 24x16"):
        dataset_from_pixels(pixels, ["a"], masks=torch.ones(2, 16, 24))
    with pytest.raises(DatasetError, match="the pictures are 3 of 24x16"):
        dataset_from_pixels(pixels, ["a"], masks=torch.ones(3, 24, 16))


def test_encoding_records_each_pictures_weights_and_where_they_came_from():
    pixels = torch.rand(3, 64, 64, 3)
    masks = torch.zeros(3, 64, 64)
    masks[:, :, :32] = 1
    dataset = dataset_from_pixels(pixels, ["a", "b", "c"], masks=masks)
    masked = MaskedLoss(dataset, unmasked_weight=0.25)
    data = encode_dataset(dataset, 64, lambda p: torch.zeros(1, 4, 8, 8), lambda c: torch.zeros(1, 7, 16),
                          loss_weight=masked)
    assert all(ex.loss_weight.shape == (8, 8) for ex in data.examples)
    assert masked.description() == "3 of 3 pictures (3 MASK input); outside a mask the loss weighs 0.25"
    batch = data.loss_weights([0, 2], torch.device("cpu"))
    assert batch.shape == (2, 1, 8, 8) and torch.equal(batch[:, 0, :, 4:], torch.full((2, 8, 4), 0.25))
    data.examples[1].loss_weight = None                   # a picture without a mask weighs 1 beside masked ones
    assert torch.equal(data.loss_weights([1, 0], torch.device("cpu"))[0], torch.ones(1, 8, 8))
    for example in data.examples:
        example.loss_weight = None
    assert data.loss_weights([0, 1], torch.device("cpu")) is None
    with pytest.raises(ValueError, match="unmasked_weight is 1.0"):
        MaskedLoss(dataset, unmasked_weight=1.0)


@pytest.mark.parametrize("loss_type", ["l2", "l1", "huber"])
def test_the_masked_loss_is_the_hand_weighted_mean(loss_type):
    """Σ w · ℓ(x0_pred − x0) / (number of latent values): kohya's apply_masked_loss, the mean over every pixel.
    Tolerance: the same float32 products summed in another order, losses of order 1: 1e-6 relative."""
    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 16)
    noise, u = torch.randn(2, 4, 8, 8), torch.tensor([0.3, 0.8])
    weights = torch.rand(2, 1, 8, 8)
    settings = NoiseSettings(loss_type=loss_type, huber_schedule="constant", huber_c=0.5)
    with torch.no_grad():
        got = denoising_loss(model, latents, cond, noise, u, settings, pixel_weights=weights)
        sigma = model.training_sigmas(u)
        error = (model.denoise(model.noisy_latents(latents, noise, sigma), sigma, cond) - latents) / sigma.view(-1, 1, 1, 1)
        if loss_type == "l2":
            per_value = error ** 2
        elif loss_type == "l1":
            per_value = error.abs()
        else:                                              # kohya's huber: 2c(sqrt(e² + c²) − c)
            per_value = 2 * 0.5 * ((error ** 2 + 0.5 ** 2).sqrt() - 0.5)
        expected = (per_value * weights).sum() / per_value.numel()
        unmasked = denoising_loss(model, latents, cond, noise, u, settings)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert abs(got.item() - unmasked.item()) > 1e-3 * unmasked.item()


def test_training_passes_each_batchs_masks_to_the_loss():
    """With every mask black and nothing outside counting, there is nothing to learn: the loss is exactly 0 and
    the weights do not move (no weight decay either). The same run without masks has a loss."""
    def run(masked):
        torch.manual_seed(0)
        model = TinyEpsDenoiser()
        data = toy_data(n=4)
        if masked:
            for example in data.examples:
                example.loss_weight = torch.zeros(example.latent.shape[1:])
        losses = []
        before = [p.detach().clone() for p in model.parameters()]
        train(model, data, list(model.parameters()), TrainSettings(steps=2, batch_size=2, learning_rate=1e-2, weight_decay=0.0),
              torch.device("cpu"), on_step=lambda report: losses.append(report.loss))
        return losses, all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert run(masked=True) == ([0.0, 0.0], True)
    losses, unchanged = run(masked=False)
    assert min(losses) > 0 and not unchanged
