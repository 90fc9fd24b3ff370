"""Train LoRA in a real in-process ComfyUI with small random-weight SD1.5-architecture models."""
from __future__ import annotations

import itertools
import logging
import math

import pytest
import torch
from safetensors import safe_open

import random_models
from training import (
    SIZE, assert_base_untouched, assert_loader_matches_adapter, cancel_at_step, encoded_training_set, options,
    pattern_pixels, run_train, saved_tensors, training_loss, weights_snapshot)


def test_training_learns_saves_and_leaves_the_base_model_alone(fresh_unet, sd15_clip, small_vae,
                                                                make_dataset, loras_dir):
    import comfy.lora
    dataset = make_dataset(4)
    data = encoded_training_set(fresh_unet, sd15_clip, small_vae, dataset)
    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    base_loss = training_loss(fresh_unet, data)

    result = run_train(fresh_unet, sd15_clip, small_vae, dataset, "learns", steps=40,
                       options=options(save_precision="fp32"), learning_rate=2e-3, rank=8, alpha=8.0)
    model_out, clip_out, lora_name, curve, previews, trigger_word = result["result"]

    assert_base_untouched(fresh_unet, before, flags)
    trained_loss = training_loss(model_out, data)
    assert trained_loss < 0.8 * base_loss, f"no learning: {base_loss:.4f} -> {trained_loss:.4f}"
    assert lora_name == "learns.safetensors"
    assert curve.shape[0] == 1 and curve.shape[-1] == 3 and 0 <= curve.min() and curve.max() <= 1
    assert len(result["ui"]["loss"]) == 40
    assert previews.shape == (1, 64, 64, 3) and previews.max() == 0     # previews off: one black picture
    assert "previews" not in result["ui"]["text"][0]

    path = loras_dir / lora_name
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    # every saved key maps to a weight in ComfyUI's own LoRA key map: nothing "not loaded"
    key_map = comfy.lora.model_lora_keys_unet(fresh_unet.model, {})
    modules = {k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in keys}
    assert modules and all(m in key_map for m in modules)
    assert all(m.startswith("lora_unet_") for m in modules)
    assert len(keys) == 3 * len(modules)
    # kohya's SD default: transformer-block linears and proj_in/out, in diffusers-style names
    assert any(m.endswith("attn1_to_q") for m in modules) and any(m.endswith("proj_in") for m in modules)
    assert any(m.startswith("lora_unet_down_blocks_0_attentions_0") for m in modules)
    assert meta["ss_network_dim"] == "8" and float(meta["ss_network_alpha"]) == 8.0
    assert meta["ss_steps"] == "40" and meta["ss_base_model_version"] == "sd_v1"
    assert meta["ss_num_train_images"] == "4" and meta["ss_output_name"] == "learns"
    assert "sks" in meta["ss_tag_frequency"] and meta.get("sshs_model_hash")
    assert meta["loralab_trigger_word"] == "sks" == trigger_word      # the first tag all captions share
    for required in ("ss_network_module", "ss_resolution", "ss_learning_rate", "ss_training_started_at",
                     "ss_training_finished_at"):
        assert meta.get(required), required


def test_saved_file_through_comfyuis_lora_loader_equals_the_trained_adapter(fresh_unet, sd15_clip, small_vae,
                                                                             make_dataset, caplog):
    """Load the file with ComfyUI's own LoraLoader node and compare with the adapter held in peft."""
    import comfy.model_management
    import nodes as comfy_nodes
    from lora_lab.nodes import comfy_bridge
    from lora_lab.trainer.lora.adapters import InjectedLora
    from lora_lab.trainer.lora.files import load_lora_file
    import folder_paths

    dataset = make_dataset(2)
    result = run_train(fresh_unet, sd15_clip, small_vae, dataset, "roundtrip", steps=3,
                       options=options(save_precision="fp32"), learning_rate=1e-2)
    lora_name = result["result"][2]
    with caplog.at_level(logging.WARNING), torch.inference_mode():
        loaded_model, _ = comfy_nodes.LoraLoader().load_lora(fresh_unet, sd15_clip, lora_name, 1.0, 1.0)
    assert "not loaded" not in caplog.text.lower()

    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 8, 8, generator=g)
    sigma = torch.tensor([2.0])
    cond = torch.randn(1, 77, 768, generator=g)
    with torch.no_grad():
        comfy.model_management.load_models_gpu([loaded_model])
        via_loader = loaded_model.model.apply_model(x, sigma, c_crossattn=cond).clone()
        comfy.model_management.load_models_gpu([fresh_unet])   # unpatches the LoRA again
        plain = fresh_unet.model.apply_model(x, sigma, c_crossattn=cond).clone()
        tensors, _ = load_lora_file(folder_paths.get_full_path("loras", lora_name))
        with comfy_bridge.trainable_unet(fresh_unet, checkpointing=False) as network:
            with InjectedLora(network, comfy_bridge.unet_lora_targets(fresh_unet), rank=4, alpha=4.0) as lora:
                lora.load_kohya_state_dict(tensors)
                via_adapter = fresh_unet.model.apply_model(x, sigma, c_crossattn=cond).clone()
    assert_loader_matches_adapter(via_loader, via_adapter, plain)


def test_cancel_saves_the_partial_lora_and_restores_the_model(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                               loras_dir):
    import comfy.model_management
    dataset = make_dataset(2)
    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    with cancel_at_step(1, 50), pytest.raises(comfy.model_management.InterruptProcessingException):
        run_train(fresh_unet, sd15_clip, small_vae, dataset, "cancelled", steps=50)
    assert (loras_dir / "cancelled_step1.safetensors").is_file(), "Cancel must stop within one step and save"
    assert not (loras_dir / "cancelled.safetensors").exists()
    assert not (loras_dir / "cancelled_step2.safetensors").exists()
    assert_base_untouched(fresh_unet, before, flags)


def test_cancel_while_encoding_stops_before_training(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    import comfy.model_management
    comfy.model_management.interrupt_current_processing(True)   # pressed before the first picture is done
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "cancel_early", steps=5)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    assert not list(loras_dir.glob("cancel_early*"))


def test_an_error_inside_training_keeps_the_work_and_restores_the_model(fresh_unet, sd15_clip, small_vae,
                                                                       make_dataset, loras_dir, loss_fails_at_call):
    dataset = make_dataset(2)
    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    with loss_fails_at_call(3), pytest.raises(RuntimeError, match="simulated"):
        run_train(fresh_unet, sd15_clip, small_vae, dataset, "crashes", steps=10)
    assert (loras_dir / "crashes_step2.safetensors").is_file()
    assert_base_untouched(fresh_unet, before, flags)


def test_gpu_out_of_memory_keeps_the_work_and_says_what_to_change(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                                   loras_dir, loss_fails_at_call):
    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    with loss_fails_at_call(3, "CUDA out of memory. Tried to allocate 2.00 GiB", torch.cuda.OutOfMemoryError), \
            pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "out_of_memory", steps=10)
    text = str(error.value)
    assert "Train LoRA › batch_size" in text and "ran out of memory at step 3" in text
    assert "gradient_checkpointing" in text and "out_of_memory_step2.safetensors" in text
    assert (loras_dir / "out_of_memory_step2.safetensors").is_file()
    assert_base_untouched(fresh_unet, before, flags)


def test_optimizer_args_the_optimizer_does_not_take_are_refused_before_any_work(fresh_unet, sd15_clip, small_vae,
                                                                                make_dataset, loras_dir, monkeypatch):
    from lora_lab.nodes import train as train_node
    monkeypatch.setattr(train_node, "encode_for_training", lambda *a, **k: pytest.fail("the dataset was encoded"))
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "bad_args", steps=2,
                  options=options(optimizer="AdamW", optimizer_args="d_coef=2 decouple=True"))
    text = str(error.value)
    assert "Train LoRA › options" in text and "optimizer_args" in text and "d_coef" in text and "Fix:" in text
    assert not list(loras_dir.glob("bad_args*"))


def test_a_picture_changed_since_the_scan_is_reported_by_train_lora(fresh_unet, sd15_clip, small_vae, tmp_path):
    from PIL import Image
    from lora_lab.trainer.data.folder_scan import scan_folder
    for i in range(2):
        Image.fromarray((pattern_pixels(1, seed=i)[0].numpy() * 255).astype("uint8")).save(tmp_path / f"p{i}.png")
    dataset = scan_folder(str(tmp_path))
    (tmp_path / "p1.png").unlink()
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, dataset, "vanished", steps=2)
    assert "Train LoRA › dataset" in str(error.value) and "Fix:" in str(error.value)


def test_non_finite_loss_stops_with_a_clear_message(fresh_unet, sd15_clip, small_vae, make_dataset, monkeypatch):
    from lora_lab.trainer.training import loop
    monkeypatch.setattr(loop, "denoising_loss", lambda *a, **k: torch.tensor(float("nan"), requires_grad=True))
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "nan", steps=3)
    text = str(error.value)
    assert "Train LoRA" in text and "learning_rate" in text and "nan" in text.lower() and "Fix:" in text


def test_mixed_aspect_ratios_train_in_buckets(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    from lora_lab.trainer.data.dataset import dataset_from_pixels
    import json
    wide = pattern_pixels(2, height=48, width=96)
    tall = pattern_pixels(2, height=96, width=48, seed=1)
    with torch.inference_mode():
        a = dataset_from_pixels(wide, ["sks, wide"])
        b = dataset_from_pixels(tall, ["sks, tall"])
    from dataclasses import replace
    merged = replace(a, items=a.items + tuple(replace(i, key=i.key + "b") for i in b.items),
                     pixels=None)
    # A folder-free dataset of mixed sizes: give each item its own picture through load_image.
    pictures = [a.load_image(0), a.load_image(1), b.load_image(0), b.load_image(1)]

    class Mixed(type(merged)):
        def load_image(self, index, max_side=None):
            return pictures[index]

    mixed = Mixed(items=merged.items)
    result = run_train(fresh_unet, sd15_clip, small_vae, mixed, "buckets", steps=4)
    with safe_open(str(loras_dir / result["result"][2]), "pt") as f:
        buckets = json.loads(f.metadata()["ss_bucket_info"])["buckets"]
    assert len(buckets) == 2, buckets
    widths = sorted(bucket["resolution"][0] for bucket in buckets.values())      # kohya's {"0": {"resolution": [w, h]...
    assert widths[0] < widths[1]


def resume_from_choices() -> list[str]:
    from lora_lab.nodes.option_nodes import LoraLabSaveOptions, LoraLabTrainingOptions
    choices = LoraLabSaveOptions.INPUT_TYPES()["required"]["resume_from"][0]
    assert LoraLabTrainingOptions.INPUT_TYPES()["required"]["resume_from"][0] == choices
    return choices


def test_resume_continues_the_step_count(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    from lora_lab.nodes.option_nodes import LoraLabSaveOptions
    dataset = make_dataset(2)
    first = run_train(fresh_unet, sd15_clip, small_vae, dataset, "resumable", steps=3)
    name = first["result"][2]
    assert name in resume_from_choices(), "the save is offered as a resume point"
    (picked,) = LoraLabSaveOptions().build(resume_from=name)
    # The folder's captions now share no first tag (half captioned by hand, say) and no trigger word is
    # typed: the continued run keeps the word the save was trained with ("sks", the first run's shared tag).
    mixed = make_dataset(2, captions=["sks, striped pattern", "a striped pattern, sks"])
    second = run_train(fresh_unet, sd15_clip, small_vae, mixed, "resumable", steps=5, options=picked)
    assert len(second["ui"]["loss"]) == 2
    with safe_open(str(loras_dir / second["result"][2]), "pt") as f:
        assert f.metadata()["ss_steps"] == "5" and f.metadata()["loralab_trigger_word"] == "sks"
    assert second["result"][5] == "sks"
    assert second["result"][2] != name, "the first file must not be overwritten"


def test_resume_from_lists_the_saves_that_have_a_resume_state(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                              loras_dir):
    import shutil
    from lora_lab.nodes import folders
    from lora_lab.nodes.option_nodes import LoraLabSaveOptions, LoraLabTrainingOptions
    saved = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "listed", steps=2,
                      options=options(save_every_n_steps=1))["result"][2]
    choices = resume_from_choices()
    assert choices[0] == "none" and choices.count("none") == 1
    assert saved in choices and "listed_step1.safetensors" in choices
    shutil.copy(loras_dir / saved, loras_dir / "from_elsewhere.safetensors")      # a LoRA without a state
    (loras_dir / "listed_sub").mkdir(exist_ok=True)
    shutil.copy(loras_dir / saved, loras_dir / "listed_sub" / "moved.safetensors")
    state = folders.resume_state_path(loras_dir / "listed_sub" / "moved.safetensors")
    state.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(folders.resume_state_path(loras_dir / saved), state)
    try:
        choices = resume_from_choices()
        assert "from_elsewhere.safetensors" not in choices
        assert any(name.replace("\\", "/") == "listed_sub/moved.safetensors" for name in choices), choices

        # Saved before resume_from was a list ("" in a text box) or picked "none": no resume, valid.
        for node, nothing in itertools.product((LoraLabSaveOptions, LoraLabTrainingOptions), ("", "  ", "none")):
            assert node.VALIDATE_INPUTS(resume_from=nothing) is True
            assert node().build(resume_from=nothing)[0].resume_from == ""
        assert LoraLabSaveOptions.VALIDATE_INPUTS(resume_from=saved) is True

        # Names that are not (or no longer) on the list: the node, the input and what to do.
        folders.resume_state_path(loras_dir / "listed_step1.safetensors").unlink()
        for name, problem in (("from_elsewhere.safetensors", "has no resume state"),
                              ("listed_step1.safetensors", "has no resume state"),
                              ("deleted_since.safetensors", "is not in any loras folder"),
                              ("old.ckpt", "Python pickle")):
            message = LoraLabSaveOptions.VALIDATE_INPUTS(resume_from=name)
            assert isinstance(message, str), name
            assert "[LoRA Lab · Saves & Resume › resume_from]" in message and problem in message, message
            assert "Fix: pick a save from the list" in message and "'none'" in message, message
            # Also when the node runs: ComfyUI 2024-03 never validates a node feeding an optional input.
            with pytest.raises(ValueError) as raised:
                LoraLabSaveOptions().build(resume_from=name)
            assert str(raised.value) == message
        assert "listed_step1.safetensors" not in resume_from_choices()
    finally:
        (loras_dir / "from_elsewhere.safetensors").unlink()
        shutil.rmtree(loras_dir / "listed_sub")
        shutil.rmtree(state.parent)


def test_resumed_run_equals_an_uninterrupted_one(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir,
                                                 one_arithmetic_path):
    """Cancel a 5-step run after step 3, resume its save to 5 == 5 steps straight (same seed): weights,
    optimizer, LR schedule, loss scaler and RNG all continue where they stopped."""
    import comfy.model_management
    dataset = make_dataset(3)
    exact = dict(save_precision="fp32", lr_schedule="cosine", warmup_steps=1, noise_offset=0.05)
    straight = run_train(fresh_unet, sd15_clip, small_vae, dataset, "straight", steps=5, options=options(**exact))
    with cancel_at_step(3, 5), pytest.raises(comfy.model_management.InterruptProcessingException):
        run_train(fresh_unet, sd15_clip, small_vae, dataset, "halfway", steps=5, options=options(**exact))
    resumed = run_train(fresh_unet, sd15_clip, small_vae, dataset, "continued", steps=5,
                        options=options(resume_from="halfway_step3.safetensors", **exact))
    assert resumed["ui"]["loss"] == pytest.approx(straight["ui"]["loss"][3:], rel=1e-6)
    a, b = saved_tensors(loras_dir, straight["result"][2]), saved_tensors(loras_dir, resumed["result"][2])
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst < 1e-6, worst


def test_existing_file_is_never_overwritten_by_default(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    dataset = make_dataset(2)
    existing = loras_dir / "taken.safetensors"
    existing.write_bytes(b"someone's LoRA")
    result = run_train(fresh_unet, sd15_clip, small_vae, dataset, "taken", steps=1)
    assert existing.read_bytes() == b"someone's LoRA"
    assert result["result"][2] == "taken_2.safetensors"


def test_a_new_run_never_takes_a_name_whose_periodic_saves_exist(pack, loras_dir):
    from lora_lab.nodes.folders import loras_root
    from lora_lab.trainer.training.saves import free_base_name
    for leftover in ("killed_run_epoch2", "char[v2]_step10", "char[v2]_2_epoch1"):   # runs killed before the end
        (loras_dir / f"{leftover}.safetensors").write_bytes(b"an earlier run's save")
    assert free_base_name(loras_root(), "killed_run", overwrite=False) == "killed_run_2"
    assert free_base_name(loras_root(), "char[v2]", overwrite=False) == "char[v2]_3"      # brackets are not a glob pattern
    assert free_base_name(loras_root(), "killed_run", overwrite=True) == "killed_run"


@pytest.mark.parametrize("bad_name", ["../escape", "/abs/path", "CON", "a\x00b"])
def test_bad_output_names_are_refused_before_training(fresh_unet, sd15_clip, small_vae, make_dataset, bad_name):
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(1), bad_name, steps=1)
    assert "output_name" in str(error.value) and "Fix:" in str(error.value)


def test_same_seed_same_lora_and_checkpointing_changes_nothing(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                               loras_dir, monkeypatch, one_arithmetic_path):
    from lora_lab.trainer.training import gradient_checkpointing as checkpointing
    recomputed = []
    real_checkpoint = checkpointing.checkpoint

    def counting_checkpoint(function, forward, *args, **kwargs):
        recomputed.append(type(getattr(forward, "__self__", None)).__name__)
        return real_checkpoint(function, forward, *args, **kwargs)

    monkeypatch.setattr(checkpointing, "checkpoint", counting_checkpoint)
    dataset = make_dataset(2)
    fp32 = options(save_precision="fp32")
    lr, steps = 1e-3, 3
    a = run_train(fresh_unet, sd15_clip, small_vae, dataset, "det_a", steps=steps, learning_rate=lr,
                  options=fp32)["result"][2]
    b = run_train(fresh_unet, sd15_clip, small_vae, dataset, "det_b", steps=steps, learning_rate=lr,
                  options=fp32)["result"][2]
    assert not recomputed
    c = run_train(fresh_unet, sd15_clip, small_vae, dataset, "det_c", steps=steps, learning_rate=lr,
                  options=options(save_precision="fp32", gradient_checkpointing=True))["result"][2]
    assert {"BasicTransformerBlock", "ResBlock"} <= set(recomputed), "checkpointing never ran"
    ta, tb, tc = (saved_tensors(loras_dir, n) for n in (a, b, c))
    assert ta.keys() == tb.keys() == tc.keys()
    for key in ta:
        assert torch.equal(ta[key], tb[key]), f"{key} differs between two runs with the same seed"
    # Checkpointing recomputes the same forward bit for bit, but backward then sums gradients in another
    # order: they differ by a few fp32 ulps (measured 1e-6 relative, both ComfyUI versions). AdamW moves
    # each element by about lr per step whatever its gradient's size, so an element whose gradient is
    # near zero can take a noticeably different step: elementwise differences of 1e-5 were measured
    # (0.4 % of lr x steps), and in principle one element can flip by a whole step. Over the whole LoRA
    # that noise stays tiny (RMS 1e-7), while a real recomputation bug changes gradients by O(1) and so
    # moves most elements by O(lr x steps). Hence: RMS difference over every element below 1 % of
    # lr x steps (3e-5, ~300x the measured noise; even a single element flipping by a full 2 x lr x steps
    # adds only 1.2e-5 over the ~260 k elements). A recompute that sees its inputs off by 1 % gives 1.7e-4.
    sum_of_squares = sum((ta[key].double() - tc[key].double()).square().sum() for key in ta)
    rms = (sum_of_squares / sum(ta[key].numel() for key in ta)).sqrt().item()
    assert rms < 0.01 * lr * steps, f"gradient checkpointing changed the LoRA: RMS difference {rms:.2e}"
    assert any(ta[k].abs().sum() > 0 for k in ta if k.endswith("lora_up.weight")), "nothing was learned"


def test_periodic_saves_and_schedules(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "periodic", steps=4,
                       options=options(save_every_n_steps=2, lr_schedule="cosine", warmup_steps=1,
                                       gradient_accumulation=2))
    assert (loras_dir / "periodic_step2.safetensors").is_file()
    from lora_lab.nodes.folders import resume_state_path
    assert resume_state_path(loras_dir / "periodic_step2.safetensors").is_file()
    assert not list(loras_dir.rglob("*.loralab-state.pt")), "state files must not appear in the LoRA loaders' lists"
    assert result["result"][2] == "periodic.safetensors"
    with safe_open(str(loras_dir / "periodic_step2.safetensors"), "pt") as f:
        assert f.metadata()["ss_steps"] == "2"


def test_saves_every_n_epochs_beside_every_n_steps(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    # 3 pictures x 2 repeats, batch 2 -> 3 steps per epoch; 3 epochs = 9 steps. Epoch saves at steps 3
    # and 6 (the last epoch is the final file), step saves at 4 and 8.
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(3, repeats=2), "by_epoch", steps=999, epochs=3,
                       options=options(save_every_n_epochs=1, save_every_n_steps=4))
    assert result["result"][2] == "by_epoch.safetensors"
    saved = sorted(p.name for p in loras_dir.glob("by_epoch*.safetensors"))
    assert saved == ["by_epoch.safetensors", "by_epoch_epoch1.safetensors", "by_epoch_epoch2.safetensors",
                     "by_epoch_step4.safetensors", "by_epoch_step8.safetensors"], saved
    for name, steps, epoch in [("by_epoch_epoch1", "3", "1"), ("by_epoch_epoch2", "6", "2"), ("by_epoch_step4", "4", "1"),
                               ("by_epoch", "9", "3")]:
        with safe_open(str(loras_dir / f"{name}.safetensors"), "pt") as f:
            assert (f.metadata()["ss_steps"], f.metadata()["ss_epoch"]) == (steps, epoch), name
    # An epoch save resumes like any other: from step 6 on.
    resumed = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(3, repeats=2), "from_epoch2", steps=999,
                        epochs=3, options=options(resume_from="by_epoch_epoch2.safetensors"))
    assert len(resumed["ui"]["loss"]) == 3


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_trains_half_precision_weights_and_restores_the_fp32_base(
        fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir, precision):
    import comfy.utils
    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    seen = []

    def look_at_the_weights(value, total, *_, **__):
        if total == 2:                                  # the training bar (encoding counts 3 pictures)
            network = fresh_unet.model.diffusion_model
            seen.append({module.weight.dtype for name, module in network.named_modules()
                         if isinstance(module, (torch.nn.Linear, torch.nn.Conv2d)) and "lora_" not in name})
    comfy.utils.set_progress_bar_global_hook(look_at_the_weights)
    try:
        result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(3), f"mp_{precision}", steps=2,
                           options=options(precision=precision))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    assert seen and all(dtypes == {half} for dtypes in seen), seen
    assert all(math.isfinite(v) for v in result["ui"]["loss"])
    assert_base_untouched(fresh_unet, before, flags)            # the fp32 originals are back, bitwise
    with safe_open(str(loras_dir / result["result"][2]), "pt") as f:
        assert f.metadata()["ss_mixed_precision"] == precision


def test_epochs_use_the_kohya_arithmetic(fresh_unet, sd15_clip, small_vae, make_dataset):
    # 3 pictures x 2 repeats = 6 per epoch; batch 2 -> 3 steps per epoch; 2 epochs -> 6 steps
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(3, repeats=2), "epochs", steps=999, epochs=2)
    assert len(result["ui"]["loss"]) == 6
    assert "3 steps per epoch" in result["ui"]["text"][0] and "2 epochs = 6 steps" in result["ui"]["text"][0]


def test_resuming_a_run_that_already_has_its_epochs_names_epochs(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                                 loras_dir):
    first = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(3, repeats=2), "two_epochs", steps=999, epochs=2)
    with pytest.raises(ValueError) as error:
        run_train(fresh_unet, sd15_clip, small_vae, make_dataset(3, repeats=2), "two_epochs_more", steps=999,
                  epochs=2, options=options(resume_from=first["result"][2]))
    assert "Train LoRA › epochs" in str(error.value) and "set epochs above 2" in str(error.value)


def test_settings_that_do_nothing_here_are_named_in_the_report(fresh_unet, sd15_clip, small_vae, make_dataset):
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "noted", steps=2,
                       options=options(lr_schedule="constant", warmup_steps=5, scale_v_pred_loss=True))
    report = result["ui"]["text"][0]
    assert "note: warmup_steps (5) does nothing with the constant schedule" in report
    assert "note: scale_v_pred_loss does nothing here" in report


def test_epochs_with_gradient_accumulation_count_batches_as_kohya_does(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                                      loras_dir):
    # 5 pictures, batch 2 -> 3 batches an epoch; accumulation 2 -> 1.5 steps an epoch: 4 epochs = 6 steps,
    # epochs 1..3 end inside steps 2, 3 and 5 (batches 3, 6, 9 of 2 per step)
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(5), "accumulated", steps=999, epochs=4,
                       options=options(gradient_accumulation=2, save_every_n_epochs=1))
    assert len(result["ui"]["loss"]) == 6
    assert "3 batches per epoch" in result["ui"]["text"][0] and "4 epochs = 6 steps" in result["ui"]["text"][0]
    for name, steps, epoch in [("accumulated_epoch1", "2", "1"), ("accumulated_epoch2", "3", "2"),
                               ("accumulated_epoch3", "5", "3"), ("accumulated", "6", "4")]:
        with safe_open(str(loras_dir / f"{name}.safetensors"), "pt") as f:
            meta = f.metadata()
            assert (meta["ss_steps"], meta["ss_epoch"], meta["ss_num_epochs"]) == (steps, epoch, "4"), name
    by_steps = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(5), "accumulated_by_steps", steps=7,
                         options=options(gradient_accumulation=2))
    with safe_open(str(loras_dir / by_steps["result"][2]), "pt") as f:
        assert f.metadata()["ss_num_epochs"] == "5"           # 7 steps x 2 batches / 3 = 4.7: five epochs begun


def test_requeue_with_another_learning_rate_reuses_the_latents(fresh_unet, sd15_clip, make_dataset):
    vae = random_models.small_vae(seed=9)
    real_encode, calls = vae.encode, []

    def counting_encode(pixels):
        calls.append(pixels.shape)
        return real_encode(pixels)

    vae.encode = counting_encode   # a spy on this one VAE object; the real encoder still runs
    dataset = make_dataset(3)
    run_train(fresh_unet, sd15_clip, vae, dataset, "cache_a", steps=1)
    assert len(calls) == 3
    run_train(fresh_unet, sd15_clip, vae, dataset, "cache_b", steps=1, learning_rate=5e-4)
    assert len(calls) == 3, "the second run encoded the pictures again"


def test_long_and_short_captions_share_a_batch(fresh_unet, sd15_clip, small_vae, make_dataset):
    long_caption = "sks, " + ", ".join(f"tag{i}" for i in range(90))   # > 75 tokens: 154-token conditioning
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2, captions=["sks, short", long_caption]),
                       "long_captions", steps=2, batch_size=2)
    assert all(math.isfinite(v) for v in result["ui"]["loss"])


def test_unsupported_model_family_fails_before_any_work(comfy, sd15_clip, small_vae, make_dataset):
    import comfy.model_patcher
    import comfy.supported_models
    # The SDXL refiner (aesthetic-score conditioning, CLIP-G only) is not trained by LoRA Lab.
    config = comfy.supported_models.SDXLRefiner(dict(random_models.sd15_unet_config(32), adm_in_channels=2560,
                                                     context_dim=1280, use_linear_in_transformer=True,
                                                     transformer_depth=[0, 0, 1, 1, 0, 0, 0, 0],
                                                     transformer_depth_output=[0] * 12, num_head_channels=64))
    patcher = comfy.model_patcher.ModelPatcher(config.get_model({}), load_device=torch.device("cpu"),
                                               offload_device=torch.device("cpu"))
    with pytest.raises(ValueError) as error:
        run_train(patcher, sd15_clip, small_vae, make_dataset(1), "refiner", steps=1)
    message = str(error.value)
    assert "SDXLRefiner" in message and "model" in message and "Fix:" in message and "SDXL" in message


KOHYA_OPTIONS = dict(
    lr_schedule="cosine_with_restarts", warmup_steps=1, gradient_accumulation=1, max_grad_norm=1.0,
    gradient_checkpointing=False, precision="auto", dropout=0.1, save_every_n_steps=0, save_precision="fp16",
    overwrite_existing=False, resume_from="", optimizer="Adafactor", optimizer_args="", weight_decay=0.0,
    lr_cycles=2, noise_offset=0.1, min_timestep=100, max_timestep=900, min_snr_gamma=5.0,
    scale_v_pred_loss=False, caption_dropout=0.3, shuffle_tags=True, keep_tokens=1, tag_dropout=0.1,
    latent_disk_cache=False)


def chained_option_nodes(values: dict):
    """The options the small option nodes give, chained one into the next, each with its share of `values`."""
    from lora_lab.nodes import option_nodes
    options = None
    for node in option_nodes.GROUP_NODES:
        inputs = node.INPUT_TYPES()["required"]
        (options,) = node().build(options=options, **{k: v for k, v in values.items() if k in inputs})
    return options


def test_option_nodes_chained_equal_the_all_in_one_node(pack):
    """A workflow saved with the deprecated all-in-one node trains the same as the chain that replaces it."""
    import dataclasses
    from lora_lab.nodes.option_nodes import LoraLabTrainingOptions
    (all_in_one,) = LoraLabTrainingOptions().build(**KOHYA_OPTIONS)
    chained = chained_option_nodes(KOHYA_OPTIONS)
    assert dataclasses.replace(chained, groups_set=frozenset()) == dataclasses.replace(all_in_one,
                                                                                        groups_set=frozenset())
    assert chained.groups_set == all_in_one.groups_set


def test_kohya_options_train_together(fresh_unet, sd15_clip, small_vae, make_dataset, loras_dir):
    opts = chained_option_nodes(KOHYA_OPTIONS)
    # Captions vary per step here, so CLIP runs inside the loop: it must be loaded up front, never through
    # ComfyUI's loader mid-run (which could unload the UNet, adapters and all, on a tight GPU).
    import comfy.model_management
    import comfy.utils
    training, loads_while_training = [], []
    real_load = comfy.model_management.load_models_gpu

    def spy_load(models, *args, **kwargs):
        if training:
            loads_while_training.append([type(m).__name__ for m in models])
        return real_load(models, *args, **kwargs)

    comfy.utils.set_progress_bar_global_hook(lambda value, total, *_, **__: training.append(value) if total == 4 else None)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(comfy.model_management, "load_models_gpu", spy_load)
            result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(3), "kohya_opts", steps=4, options=opts)
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert len(result["ui"]["loss"]) == 4 and all(math.isfinite(v) for v in result["ui"]["loss"])
    assert "latent disk cache: off" in result["ui"]["text"][0]
    assert training and not loads_while_training, loads_while_training


def test_latent_disk_cache_is_warm_on_a_second_run(comfy, fresh_unet, sd15_clip, make_dataset):
    dataset = make_dataset(2, captions=["sks, disk cache"])
    cold = run_train(fresh_unet, sd15_clip, random_models.small_vae(seed=21), dataset, "disk_a", steps=1,
                     options=options(latent_disk_cache=True))
    # Another VAE object with the same weights (a new session, say): memory is cold, the disk is warm.
    warm = run_train(fresh_unet, sd15_clip, random_models.small_vae(seed=21), dataset, "disk_b", steps=1,
                     options=options(latent_disk_cache=True))
    assert "0 hit(s), 2 miss(es), 2 written" in cold["ui"]["text"][0]
    assert "2 hit(s), 0 miss(es)" in warm["ui"]["text"][0]


@pytest.mark.parametrize("node", ["LoraLabOptimizerOptions", "LoraLabTrainingOptions"])
def test_options_node_refuses_a_missing_optimizer_package_at_validation(pack, node):
    from lora_lab.nodes.option_nodes import NODE_CLASS_MAPPINGS
    import importlib.util
    make = NODE_CLASS_MAPPINGS[node]
    message = make.VALIDATE_INPUTS(optimizer="Prodigy")
    if importlib.util.find_spec("prodigyopt") is None:
        assert "prodigyopt" in message and f"[LoRA Lab · {make.TITLE} › optimizer]" in message
    else:
        assert message is True
    assert "optimizer" in make.VALIDATE_INPUTS(optimizer="SGD-made-up")


def test_keep_last_saves_deletes_only_this_runs_older_step_saves(fresh_unet, sd15_clip, small_vae, make_dataset,
                                                                  loras_dir):
    import comfy.utils
    from lora_lab.nodes.folders import resume_state_path
    others = [loras_dir / "keeper_step1.safetensors", loras_dir / "keeper_other_step2.safetensors"]
    for other in others:                       # another run's saves, and a look-alike name
        other.write_bytes(b"another run's LoRA")

    def user_edits_step1_during_step2(value, total, *_, **__):
        if total == 5 and value == 2:          # before the step-2 save: someone replaces our step-1 file
            (loras_dir / "keeper_2_step1.safetensors").write_bytes(b"the user's own edit")

    comfy.utils.set_progress_bar_global_hook(user_edits_step1_during_step2)
    try:
        result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "keeper", steps=5,
                           options=options(save_every_n_steps=1, keep_last_saves=2))
    finally:
        comfy.utils.set_progress_bar_global_hook(None)
    assert result["result"][2] == "keeper_2.safetensors"     # keeper_step1 exists: a fresh base name
    ours = sorted(p.name for p in loras_dir.glob("keeper_2*.safetensors"))
    # steps 1..4 saved; 2 deleted as older than the last two; 1 was changed by the user, so it stays
    assert ours == ["keeper_2.safetensors", "keeper_2_step1.safetensors", "keeper_2_step3.safetensors",
                    "keeper_2_step4.safetensors"], ours
    assert (loras_dir / "keeper_2_step1.safetensors").read_bytes() == b"the user's own edit"
    assert all(other.read_bytes() == b"another run's LoRA" for other in others)
    assert not resume_state_path(loras_dir / "keeper_2_step2.safetensors").exists()
    assert resume_state_path(loras_dir / "keeper_2_step3.safetensors").is_file()
    assert resume_state_path(loras_dir / "keeper_2.safetensors").is_file()
    # the step-1 LoRA the user changed is kept, and so is its resume state
    assert resume_state_path(loras_dir / "keeper_2_step1.safetensors").is_file()


def test_a_resume_state_that_cannot_be_written_does_not_lose_the_lora(fresh_unet, sd15_clip, small_vae,
                                                                        make_dataset, loras_dir, monkeypatch, caplog):
    from lora_lab.nodes import folders
    from lora_lab.trainer.training import saves

    def full_user_folder(*_, **__):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(saves, "save_resume_state", full_user_folder)
    result = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "no_state", steps=2)
    assert result["result"][2] == "no_state.safetensors" and (loras_dir / "no_state.safetensors").is_file()
    assert "resume state could not be written" in caplog.text
    assert not folders.resume_state_path(loras_dir / "no_state.safetensors").exists()


def test_previews_render_at_the_right_steps_without_changing_the_training(fresh_unet, sd15_clip, small_vae,
                                                                           make_dataset, loras_dir,
                                                                           one_arithmetic_path):
    dataset = make_dataset(2, captions=["sks, a red square", "sks, a blue circle"])
    before = weights_snapshot(fresh_unet)
    flags = [p.requires_grad for p in fresh_unet.model.parameters()]
    plain = run_train(fresh_unet, sd15_clip, small_vae, dataset, "no_previews", steps=4)
    previews = options(preview_every_n_steps=2, preview_steps=3, preview_prompts="{trigger}, a photo\nplain words")
    shown = run_train(fresh_unet, sd15_clip, small_vae, dataset, "with_previews", steps=4, options=previews)

    assert shown["ui"]["loss"] == plain["ui"]["loss"], "previews must not change what is trained"
    images = shown["result"][4]
    assert images.shape == (4, SIZE, SIZE, 3)             # steps 2 and 4 x two prompts, decoded by the VAE
    assert not torch.equal(images[0], images[2]), "the step-4 preview should differ from the step-2 one"
    assert not torch.equal(images[0], images[1]), "each prompt has its own picture"
    report = shown["ui"]["text"][0]
    assert "previews: 4 picture(s) at step(s) 2, 4" in report
    # Shown once, in the node's strip (ui "previews", by step), never again as ComfyUI's node images.
    assert [shot["step"] for shot in shown["ui"]["previews"]] == [2, 4] and "images" not in shown["ui"]
    assert all(len(shot["images"]) == 2 and shot["images"][0]["type"] == "temp" for shot in shown["ui"]["previews"])
    assert shown["ui"]["previews"][0]["prompts"] == ["sks, a photo", "plain words"]
    assert plain["result"][4].shape[0] == 1 and "previews" not in plain["ui"]
    assert_base_untouched(fresh_unet, before, flags)


def test_the_same_run_queued_again_reuses_its_file_and_any_real_change_trains(fresh_unet, sd15_clip, small_vae,
                                                                               make_dataset, loras_dir, monkeypatch):
    """An upstream node re-ran with equal results (the Caption node wrote its sidecars, ComfyUI was
    restarted): the finished run is found by its identity and reused, even after a sampler used the
    trained MODEL; anything that shapes the weights trains anew."""
    import comfy.model_management
    from lora_lab.nodes import train as train_node
    trained = []
    real_train = train_node.train
    monkeypatch.setattr(train_node, "train", lambda *a, **k: trained.append(1) or real_train(*a, **k))

    first = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "again", steps=3)
    assert first["result"][2] == "again.safetensors" and trained == [1]
    before = weights_snapshot(fresh_unet)
    comfy.model_management.load_models_gpu([first["result"][0]])   # as KSampler does: the LoRA patched in

    again = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "again", steps=3)   # equal, new objects
    assert trained == [1], "an identical run was trained again"
    assert again["result"][2] == "again.safetensors" and not (loras_dir / "again_2.safetensors").exists()
    assert "Reused again.safetensors" in again["ui"]["text"][0]
    assert again["ui"]["loss"] == pytest.approx(first["ui"]["loss"], rel=1e-4)
    assert again["result"][0].patches.keys() == first["result"][0].patches.keys() != set()
    assert tuple(again["result"][3].shape) == tuple(first["result"][3].shape)        # the loss chart
    assert_base_untouched(fresh_unet, before, [p.requires_grad for p in fresh_unet.model.parameters()])

    changes = [dict(learning_rate=2e-3), dict(options=options(noise_offset=0.05)),
               dict(dataset=make_dataset(2, captions=["sks, striped", "sks, blocks"])),
               dict(model=first["result"][0])]                          # trained on top of a LoRA: another base
    for number, change in enumerate(changes, start=2):
        args = dict(model=fresh_unet, clip=sd15_clip, vae=small_vae, dataset=make_dataset(2), name="again")
        args.update(change)
        result = run_train(args.pop("model"), args.pop("clip"), args.pop("vae"), args.pop("dataset"),
                           args.pop("name"), steps=3, **args)
        assert result["result"][2] == f"again_{number}.safetensors", change
    assert len(trained) == 1 + len(changes)

    # Settings that cannot change the weights (previews, periodic saves) reuse the file.
    kept = run_train(fresh_unet, sd15_clip, small_vae, make_dataset(2), "again", steps=3,
                     options=options(save_every_n_steps=2, keep_last_saves=1, gradient_checkpointing=True))
    assert kept["result"][2] == "again.safetensors" and len(trained) == 1 + len(changes)
