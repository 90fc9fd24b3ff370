"""A run's saves found by name in a LoRA list (trainer/training/epoch_saves.py), without ComfyUI."""
from lora_lab.trainer.training.epoch_saves import RunSaves, run_saves, same_run

LISTED = ["char.safetensors", "char_epoch2.safetensors", "char_epoch10.safetensors", "char_epoch1.safetensors",
          "char_step40.safetensors", "char_2.safetensors", "char_2_epoch1.safetensors", "sub\\style_epoch3.safetensors",
          "chars_epoch1.safetensors", "other.safetensors", "char_epoch1_epoch1.safetensors"]
CHAR = RunSaves("char", ((1, "char_epoch1.safetensors"), (2, "char_epoch2.safetensors"),
                         (10, "char_epoch10.safetensors")), "char.safetensors")


def test_the_final_file_or_any_save_names_the_run_with_its_epochs_in_order():
    for name in ("char.safetensors", "char", " char ", "char_epoch2.safetensors", "char_step40.safetensors"):
        assert run_saves(name, LISTED) == CHAR, name
    assert run_saves("char_2.safetensors", LISTED) == RunSaves("char_2", ((1, "char_2_epoch1.safetensors"),),
                                                                 "char_2.safetensors")
    # a run really named "char_epoch1" keeps its own saves
    assert run_saves("char_epoch1_epoch1", LISTED).base == "char_epoch1"


def test_separators_do_not_matter_and_a_run_without_a_final_file_is_found():
    assert run_saves("sub/style.safetensors", LISTED) == RunSaves("sub/style", ((3, "sub\\style_epoch3.safetensors"),),
                                                                  None)


def test_nothing_to_compare_is_said_by_empty_epochs():
    assert run_saves("other.safetensors", LISTED) == RunSaves("other", (), "other.safetensors")
    assert run_saves("ghost", LISTED) == RunSaves("ghost", (), None)


def test_a_save_of_another_run_under_the_same_name_is_not_the_same_run():
    final = {"loralab_run_identity": "a"}
    assert same_run(final, {"loralab_unfinished_run": "a"})
    assert not same_run(final, {"loralab_unfinished_run": "b"})
    assert same_run(final, {}) and same_run(None, {"loralab_unfinished_run": "b"}) and same_run({}, {})
