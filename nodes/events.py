"""Every event the server sends LoRA Lab's front end, by name. js/events.js holds the same names for the
browser; tests/unit/test_js.py checks that the two agree and that the front end listens to each."""
from __future__ import annotations

TRAIN_PROGRESS = "loralab.train.progress"    # after every optimizer step: step, total, loss, lr, timing
TRAIN_STOPPED = "loralab.train.stopped"      # a run ended early (Cancel, NaN, error): step, reason, saved file
TRAIN_PREVIEW = "loralab.train.preview"      # sample previews rendered while training: step, pictures
TRAIN_STATUS = "loralab.train.status"        # a line for the node's report before the first step (distributed)

ALL = (TRAIN_PROGRESS, TRAIN_STOPPED, TRAIN_PREVIEW, TRAIN_STATUS)

# What a training run reports (trainer/training/run.py speaks these) -> the event the front end hears.
OF_TRAINING_RUN = {"progress": TRAIN_PROGRESS, "stopped": TRAIN_STOPPED}
