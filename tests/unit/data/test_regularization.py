"""Prior preservation (trainer/data/regularization.py): kohya's count of regularization pictures per epoch, their
captions from the class folder, and their loss weighted by prior_loss_weight beside the training pictures."""
from __future__ import annotations

import pytest
import torch
from PIL import Image

from lora_lab.trainer.data.dataset import DatasetError
from lora_lab.trainer.data.folder_scan import scan_folder
from lora_lab.trainer.data.regularization import kohya_repeats, with_class_captions, with_regularization
from lora_lab.trainer.training.loop import TrainSettings, batch_loss
from toy_training import TinyEpsDenoiser, toy_data


def kohya_loop(num_train_images, reg_repeats):
    """kohya's DreamBoothDataset.__init__ (sd-scripts library/train_util.py), transcribed: the reference."""
    class Info:
        def __init__(self, repeats):
            self.num_repeats = repeats
    infos = [Info(r) for r in reg_repeats]
    registered = []
    n, first_loop = 0, True
    while n < num_train_images:
        for info in infos:
            if first_loop:
                registered.append(info)
                n += info.num_repeats
            else:
                info.num_repeats += 1
                n += 1
            if n >= num_train_images:
                break
        first_loop = False
    return [info.num_repeats if info in registered else 0 for info in infos]


@pytest.mark.parametrize("train, reg", [(40, [1] * 10), (40, [1] * 100), (7, [2, 2, 2]), (10, [3]), (5, [1, 1]),
                                        (1, [4, 4]), (100, [1, 2, 3])])
def test_the_count_per_epoch_is_kohyas(train, reg):
    got = kohya_repeats(train, reg)
    assert got == kohya_loop(train, reg)
    assert sum(got) >= train and sum(got) - max(reg) < train      # enough, and no more than the last one added


def test_uncaptioned_regularization_pictures_take_their_class_folder(tmp_path):
    (tmp_path / "1_young_woman").mkdir()
    Image.new("RGB", (64, 64)).save(tmp_path / "1_young_woman" / "a.png")
    Image.new("RGB", (64, 64)).save(tmp_path / "1_young_woman" / "b.png")
    (tmp_path / "1_young_woman" / "b.txt").write_text("a photo of a woman, smiling")
    captions = [item.caption for item in with_class_captions(scan_folder(str(tmp_path))).items]
    assert captions == ["young woman", "a photo of a woman, smiling"]
    Image.new("RGB", (64, 64)).save(tmp_path / "loose.png")
    with pytest.raises(DatasetError, match="1 regularization picture.*loose.png") as refused:
        with_class_captions(scan_folder(str(tmp_path)))
    assert "folder named like 1_woman" in refused.value.fix


def test_regularization_pictures_join_the_batches_with_their_loss_weighted():
    training = toy_data(n=4)                   # 4 pictures x 2 repeats = 8 per epoch
    regularization = toy_data(n=3, seed=1)     # 3 pictures x 2 repeats: 6 < 8, so one more repeat each until 8
    merged, prior = with_regularization(training, regularization, prior_loss_weight=0.5)
    assert [ex.repeats for ex in merged.examples[4:]] == kohya_repeats(8, [2, 2, 2]) == [3, 3, 2]
    assert (prior.shown, prior.trained, prior.used) == (8, 8, 3)
    assert "an epoch has 16 pictures" in prior.description()
    assert all(ex.loss_weight is None for ex in merged.examples[:4])
    assert all(torch.equal(ex.loss_weight, torch.full((8, 8), 0.5)) for ex in merged.examples[4:])
    assert merged.epochs(batch_size=2).batches == 8          # twice the training pictures' 4 batches
    assert training.examples[0].loss_weight is None and len(training.examples) == 4     # left as it was


def test_a_regularization_pictures_loss_counts_prior_loss_weight():
    """kohya: loss per picture x its loss weight (prior_loss_weight for reg pictures), then the batch mean.
    Tolerance: the same float32 sums grouped differently; losses of order 1: 1e-6 relative."""
    torch.manual_seed(0)
    model = TinyEpsDenoiser()
    merged, _ = with_regularization(toy_data(n=1), toy_data(n=1, seed=1), prior_loss_weight=0.25)
    settings = TrainSettings(steps=1, batch_size=2)
    latents, texts, sizes = merged.collate([0, 1], torch.device("cpu"))
    noise, u = torch.randn(latents.shape), torch.tensor([0.2, 0.6])
    with torch.no_grad():
        got = batch_loss(model, latents, texts, sizes, noise, u, torch.device("cpu"), settings,
                         merged.loss_weights([0, 1], torch.device("cpu")))
        each = [batch_loss(model, latents[[i]], [texts[i]], [sizes[i]], noise[[i]], u[[i]], torch.device("cpu"),
                           settings) for i in (0, 1)]
    torch.testing.assert_close(got, (each[0] * 1.0 + each[1] * 0.25) / 2, rtol=1e-6, atol=0)


def test_a_weight_of_zero_is_refused():
    with pytest.raises(ValueError, match="prior_loss_weight is 0"):
        with_regularization(toy_data(n=1), toy_data(n=1), prior_loss_weight=0)
