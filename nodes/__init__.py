"""ComfyUI adapters. Each module registers its own nodes; this file only merges the tables."""
from . import (dataset, class_images, caption, tagger, train, train_distributed, option_nodes, pedals, pedalboard,
               prompt, epoch_grid, review, routes)

NODE_CLASS_MAPPINGS = {}
NODE_DISPLAY_NAME_MAPPINGS = {}
for _module in (dataset, class_images, caption, tagger, train, train_distributed, option_nodes, pedals, pedalboard,
                prompt, epoch_grid, review):
    NODE_CLASS_MAPPINGS.update(_module.NODE_CLASS_MAPPINGS)
    NODE_DISPLAY_NAME_MAPPINGS.update(_module.NODE_DISPLAY_NAME_MAPPINGS)

# The pedalboard's row editor and the caption review ask the server (a no-op without a server).
routes.register_with_server()

CATEGORY_ROOT = "LoRA Lab"
