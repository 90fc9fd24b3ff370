"""Tag counts across a dataset (kohya's ss_tag_frequency, summed) and their bar chart."""
import numpy as np
import torch
from PIL import Image

from lora_lab.trainer.captions.tag_chart import COMMON, TRIGGER, tag_chart
from lora_lab.trainer.captions.tag_frequency import TagCount, common_tags, count_tags, describe
from lora_lab.trainer.data.dataset import dataset_from_pixels
from lora_lab.trainer.training.kohya_metadata import picture_folders, tag_frequency

CAPTIONS = [
    "ohwx, 1girl, red dress, smile",
    "ohwx, 1girl, Red Dress , outdoors",
    "ohwx, 1girl, smile, smile",           # a tag written twice in one caption is one picture
    "ohwx, 1girl, a woman standing on a street",
    "ohwx, solo",
]


def dataset(captions=CAPTIONS):
    return dataset_from_pixels(torch.zeros(len(captions), 8, 8, 3), list(captions))


def test_counts_are_pictures_per_tag_most_frequent_first():
    counts = count_tags(dataset())
    assert [(count.tag, count.pictures) for count in counts] == [
        ("ohwx", 5), ("1girl", 4), ("red dress", 2), ("smile", 2), ("a woman standing on a street", 1),
        ("outdoors", 1), ("solo", 1)]
    assert counts[1].share == 0.8


def test_counts_agree_with_what_train_lora_writes_as_ss_tag_frequency():
    data = dataset()
    kohya = tag_frequency({folder: [item.caption for item in items] for folder, items in picture_folders(data).items()})
    summed = {}
    for tags in kohya.values():
        for tag, count in tags.items():
            summed[tag] = summed.get(tag, 0) + count
    summed["smile"] -= 1                    # kohya counts the repeated "smile" twice; we count pictures
    assert {count.tag: count.pictures for count in count_tags(data)} == summed


def test_common_tags_leave_out_the_trigger_word():
    counts = count_tags(dataset())
    assert [count.tag for count in common_tags(counts, 0.8)] == ["ohwx", "1girl"]
    assert [count.tag for count in common_tags(counts, 0.8, trigger="OHWX")] == ["1girl"]
    assert common_tags(counts, 0.9, trigger="ohwx") == []


def test_description_names_the_tags_to_prune():
    text = describe(count_tags(dataset()), 5, 0.8, trigger="ohwx")
    assert "5 picture(s), 7 distinct tag(s)" in text
    assert "On 80% or more of the pictures (1): 1girl." in text and "Prune these" in text
    assert "  1girl: 4 (80%)" in text
    assert "No captions to count" in describe([], 3)
    assert "No tag is on 90%" in describe(count_tags(dataset(["a", "b"])), 2)


def test_chart_draws_one_bar_per_tag_coloured_by_share():
    counts = count_tags(dataset())
    chart = tag_chart(counts, 5, share=0.8, trigger="ohwx", max_tags=40, width=600)
    assert chart.mode == "RGB" and chart.width == 600
    pixels = np.asarray(chart).reshape(-1, 3)
    colours = {tuple(p) for p in pixels}
    assert COMMON in colours and TRIGGER in colours
    small = tag_chart(counts, 5, share=0.8, max_tags=3, width=600)
    assert small.height < chart.height


def test_chart_of_an_empty_dataset_says_so():
    chart = tag_chart([], 0)
    assert isinstance(chart, Image.Image) and chart.height > 40


def test_long_tags_and_many_tags_fit():
    counts = [TagCount("a very long tag " * 10 + str(n), 100 - n, (100 - n) / 100) for n in range(60)]
    chart = tag_chart(counts, 100, max_tags=50)
    assert chart.height < 50 * 30 + 200
