"""Wd14Tagger on a small real ONNX tagger (exported from torch, SmilingWolf's signature): preprocessing
against the reference Space's, batches, the files' checks, and onnxruntime being optional."""
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import tagger_models
from lora_lab.trainer.captions import wd14
from lora_lab.trainer.captions.wd14 import OnnxRuntimeMissing, TaggerModelError, Wd14Tagger, files_in
from lora_lab.trainer.captions.wd14_preprocess import prepare_batch, prepare_image
from lora_lab.trainer.captions.wd14_select import TagOptions, select_tags


def reference_prepare_image(image, target_size):
    """``Predictor.prepare_image`` of https://huggingface.co/spaces/SmilingWolf/wd-tagger/blob/main/app.py,
    transcribed (``self.model_target_size`` became an argument; ``image`` is RGBA, as Gradio gives it)."""
    canvas = Image.new("RGBA", image.size, (255, 255, 255))
    canvas.alpha_composite(image)
    image = canvas.convert("RGB")

    # Pad image to square
    image_shape = image.size
    max_dim = max(image_shape)
    pad_left = (max_dim - image_shape[0]) // 2
    pad_top = (max_dim - image_shape[1]) // 2

    padded_image = Image.new("RGB", (max_dim, max_dim), (255, 255, 255))
    padded_image.paste(image, (pad_left, pad_top))

    # Resize
    if max_dim != target_size:
        padded_image = padded_image.resize(
            (target_size, target_size),
            Image.BICUBIC,
        )

    # Convert to numpy array
    image_array = np.asarray(padded_image, dtype=np.float32)

    # Convert PIL-native RGB to BGR
    image_array = image_array[:, :, ::-1]

    return np.expand_dims(image_array, axis=0)


def pictures(seed=0):
    """Wide, tall, odd-sized (padding offsets round down), already-square, translucent, grey and palette pictures."""
    rng = np.random.default_rng(seed)

    def noise(height, width, channels=3):
        shape = (height, width, channels) if channels > 1 else (height, width)
        return rng.integers(0, 256, shape, dtype=np.uint8)

    palette = Image.fromarray(noise(33, 20, 1)).convert("P")
    palette.info["transparency"] = 7
    return [Image.fromarray(noise(30, 70)), Image.fromarray(noise(91, 40)), Image.fromarray(noise(21, 64)),
            Image.fromarray(noise(64, 64)), Image.fromarray(noise(50, 37, 4), "RGBA"),
            Image.fromarray(noise(45, 45, 1), "L"), palette, Image.fromarray(noise(500, 300))]


@pytest.fixture(scope="module")
def tagger_folder(tmp_path_factory):
    return tagger_models.build_tagger(tmp_path_factory.mktemp("wd14") / "tiny", size=64)


@pytest.fixture(scope="module")
def tagger(tagger_folder):
    return Wd14Tagger(files_in(tagger_folder), "cpu", name="tiny")


# --- preprocessing --------------------------------------------------------------------------------
@pytest.mark.parametrize("target", [64, 448])
def test_preprocessing_equals_the_reference_space(target):
    for picture in pictures():
        ours = prepare_image(picture, target)
        reference = reference_prepare_image(picture.convert("RGBA"), target)[0]
        assert ours.dtype == np.float32 and ours.shape == (target, target, 3)
        np.testing.assert_array_equal(ours, reference)


def test_preprocessing_is_white_padded_bgr_0_to_255():
    red = Image.new("RGB", (64, 32), (255, 0, 0))
    array = prepare_image(red, 64)
    assert array[:16].tolist() == [[[255.0, 255.0, 255.0]] * 64] * 16          # white band on top
    assert array[16:48].reshape(-1, 3).tolist() == [[0.0, 0.0, 255.0]] * (32 * 64)   # red, in BGR
    clear = Image.new("RGBA", (8, 8), (0, 0, 0, 0))                               # transparent -> white
    assert (prepare_image(clear, 8) == 255).all()
    batch = prepare_batch([red, clear], 16)
    assert batch.shape == (2, 16, 16, 3) and batch.flags["C_CONTIGUOUS"]


# --- the runtime ----------------------------------------------------------------------------------
def test_tagger_reads_the_signature_from_the_file(tagger):
    assert tagger.input_size == 64 and tagger.max_batch is None
    assert tagger.input_name == tagger_models.INPUT_NAME and tagger.output_name == tagger_models.OUTPUT_NAME
    assert tagger.providers == ("CPUExecutionProvider",) and tagger.device == "cpu" and not tagger.on_gpu
    assert len(tagger.tags) == len(tagger_models.TAGS)


def test_colours_light_up_their_tags(tagger):
    """The test model's red_theme output reads the red channel: a red/blue swap in preprocessing would show."""
    names = ["red_theme", "green_theme", "blue_theme"]
    colours = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    rows = tagger.probabilities([Image.new("RGB", (40, 40), colour) for colour in colours])
    index = [tagger.tags.names.index(name) for name in names]
    assert (rows[:, index].argmax(axis=1) == [0, 1, 2]).all()
    assert (rows[:, index].max(axis=1) > 0.9).all()
    tags = select_tags(rows[1], tagger.tags, TagOptions())
    assert ("hatsune_miku", pytest.approx(rows[1, tagger.tags.names.index("hatsune_miku")])) in tags.character


def test_session_output_equals_the_reference_pipeline(tagger, tagger_folder):
    """Our run == onnxruntime fed the reference Space's preprocessing, picture by picture."""
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tagger_folder / "model.onnx"), providers=["CPUExecutionProvider"])
    inputs, outputs = session.get_inputs()[0], session.get_outputs()[0]
    size = inputs.shape[1]
    for picture, row in zip(pictures(), tagger.probabilities(pictures(), batch_size=1)):
        expected = session.run([outputs.name], {inputs.name: reference_prepare_image(picture.convert("RGBA"), size)})
        np.testing.assert_allclose(row, expected[0][0], rtol=0, atol=1e-6)


def test_batched_equals_one_at_a_time(tagger):
    images = pictures(1) + [Image.new("RGB", (40, 30), colour) for colour in ((255, 0, 0), (0, 200, 0))]
    single = tagger.probabilities(images, batch_size=1)
    for batch_size in (3, 4, 64):
        batched = tagger.probabilities(images, batch_size=batch_size)
        # onnxruntime picks its kernels by batch size: float sums differ in their last bits (here < 3e-5).
        np.testing.assert_allclose(batched, single, rtol=0, atol=1e-4)
        assert [select_tags(row, tagger.tags, TagOptions()).caption_tags(TagOptions()) for row in batched] == \
               [select_tags(row, tagger.tags, TagOptions()).caption_tags(TagOptions()) for row in single]


def test_progress_callback_per_batch_and_an_exception_there_stops(tagger):
    calls = []
    tagger.probabilities(pictures(), batch_size=3, on_batch_done=lambda done, total: calls.append((done, total)))
    assert calls == [(3, 8), (6, 8), (8, 8)]

    class Loaded(list):
        def __getitem__(self, index):
            self.asked.append(index)
            return super().__getitem__(index)
    lazy = Loaded(pictures())
    lazy.asked = []

    def cancel(done, total):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tagger.probabilities(lazy, batch_size=2, on_batch_done=cancel)
    # The next batch is prepared while the model runs this one: at most that one is read ahead of Cancel.
    assert lazy.asked == [0, 1, 2, 3], "only the first batch and the one prepared ahead may be read before Cancel"
    lazy.asked = []
    with pytest.raises(KeyboardInterrupt):
        tagger.probabilities(lazy, batch_size=2, on_batch_done=cancel, prepare_ahead=False)
    assert lazy.asked == [0, 1]
    assert tagger.probabilities([], batch_size=4).shape == (0, len(tagger.tags))
    with pytest.raises(ValueError):
        tagger.probabilities(pictures(), batch_size=0)


def test_a_fixed_batch_export_is_fed_its_batch_size(tmp_path, tagger):
    folder = tagger_models.build_tagger(tmp_path / "fixed", size=64, fixed_batch=1)
    fixed = Wd14Tagger(files_in(folder), "cpu")
    assert fixed.max_batch == 1 and fixed.name == "fixed"
    np.testing.assert_allclose(fixed.probabilities(pictures(), batch_size=8),
                               tagger.probabilities(pictures(), batch_size=1), rtol=0, atol=1e-6)


def test_files_from_different_taggers_are_refused(tmp_path, tagger_folder):
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "model.onnx").write_bytes((tagger_folder / "model.onnx").read_bytes())
    tagger_models.write_tag_list(folder / "selected_tags.csv", tagger_models.TAGS[:5])
    with pytest.raises(TaggerModelError, match="has 18 outputs but .* lists 5 tags"):
        Wd14Tagger(files_in(folder), "cpu")


def test_a_model_that_is_not_a_tagger_is_refused(tmp_path, tagger_folder):
    folder = tmp_path / "nchw"
    folder.mkdir()
    (folder / "selected_tags.csv").write_bytes((tagger_folder / "selected_tags.csv").read_bytes())
    channels_first = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 18))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(channels_first.eval(), (torch.zeros(1, 3, 32, 32),), str(folder / "model.onnx"),
                          dynamo=False)
    with pytest.raises(TaggerModelError, match="is not a WD14 tagger"):
        Wd14Tagger(files_in(folder), "cpu")
    (folder / "model.onnx").write_bytes(b"not onnx")
    with pytest.raises(TaggerModelError, match="could not load"):
        Wd14Tagger(files_in(folder), "cpu")


def test_files_and_providers_helpers(tmp_path, tagger_folder):
    assert wd14.missing_files(tagger_folder) == []
    assert wd14.missing_files(tmp_path) == ["model.onnx", "selected_tags.csv"]
    assert wd14.providers_for("cuda") == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    assert wd14.providers_for("cpu") == ["CPUExecutionProvider"]
    with pytest.raises(ValueError):
        wd14.providers_for("mps")
    assert wd14.hub_url("SmilingWolf/wd-vit-tagger-v3") == \
        "https://huggingface.co/SmilingWolf/wd-vit-tagger-v3/tree/main"
    assert set(wd14.KNOWN_MODELS) == {"wd-v1-4-moat-tagger-v2", "wd-swinv2-tagger-v3", "wd-vit-tagger-v3",
                                      "wd-convnext-tagger-v3", "wd-eva02-large-tagger-v3"}
    assert all(repo == f"SmilingWolf/{name}" for name, repo in wd14.KNOWN_MODELS.items())


# --- onnxruntime is optional ------------------------------------------------------------------------
def test_missing_onnxruntime_says_how_to_install_it(monkeypatch, tagger_folder):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)       # `import onnxruntime` raises ImportError
    with pytest.raises(OnnxRuntimeMissing) as raised:
        Wd14Tagger(files_in(tagger_folder), "cpu")
    message = str(raised.value)
    assert "pip install onnxruntime`" in message and "pip install onnxruntime-gpu" in message


def test_the_tagger_modules_import_without_onnxruntime():
    code = ("import sys, types\n"
            "sys.modules['onnxruntime'] = None\n"
            f"pack = types.ModuleType('lora_lab'); pack.__path__ = [{str(Path(wd14.__file__).parents[2])!r}]\n"
            "sys.modules['lora_lab'] = pack\n"
            "import lora_lab.trainer.captions.wd14, lora_lab.trainer.captions.tag_chart\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
