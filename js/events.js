// Every event the server sends LoRA Lab's front end, by name: the same names as nodes/events.py
// (tests/unit/test_js.py checks that the two agree).
export const TRAIN_PROGRESS = "loralab.train.progress";
export const TRAIN_STOPPED = "loralab.train.stopped";
export const TRAIN_PREVIEW = "loralab.train.preview";
export const TRAIN_STATUS = "loralab.train.status";
