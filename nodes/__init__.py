"""ComfyUI adapters. Each module registers its own nodes; this file only merges the tables."""
from . import dataset, caption, train, training_options, stack

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (dataset, caption, train, training_options, stack):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

CATEGORY_ROOT = "LoRA Lab"
