"""Convert a UI-format workflow (what the front end saves) to an API-format prompt (what /prompt runs).

The same job as the front end's ``app.graphToPrompt``, done from the server's ``/object_info`` so
tests can run bundled workflows without a browser (the browser tests compare the two). Widget values
are stored in the order the node declares its widget inputs (required, then optional); a seed-like
INT widget is followed by its ``control_after_generate`` value, which is not an input.
"""
from __future__ import annotations

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SEED_NAMES = {"seed", "noise_seed"}          # the front ends add a control widget to these by name
FRONTEND_ONLY = {"Note", "MarkdownNote"}     # nodes the front end keeps out of the prompt
MUTED, BYPASSED = 2, 4


class WorkflowError(ValueError):
    pass


def widget_inputs(node_info: dict, node: dict | None = None) -> list[tuple[str, str, dict]]:
    """(name, type, options) of each input shown as a widget, in the order widgets_values uses.

    A ``forceInput`` input is a socket only, except that the legacy front end makes it a widget
    converted to an input — then the saved node marks it with "widget" and it holds a value slot.
    """
    converted = {slot["name"] for slot in (node or {}).get("inputs", []) if slot.get("widget")}
    declared = node_info["input"]
    order = node_info.get("input_order") or {k: list(declared.get(k, {})) for k in ("required", "optional")}
    widgets = []
    for section in ("required", "optional"):
        for name in order.get(section, []):
            spec = declared.get(section, {}).get(name)
            if spec is None:
                continue
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind = "COMBO" if isinstance(kind, list) else kind
            if kind in WIDGET_TYPES and (not options.get("forceInput") or name in converted):
                widgets.append((name, kind, options))
    return widgets


def has_control_widget(name: str, kind: str, options: dict) -> bool:
    return kind == "INT" and (bool(options.get("control_after_generate")) or name in SEED_NAMES)


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow.get("links", [])}
    prompt = {}
    for node in workflow["nodes"]:
        kind = node["type"]
        if kind in FRONTEND_ONLY or node.get("mode") in (MUTED, BYPASSED):
            continue
        if kind not in object_info:
            raise WorkflowError(f"node {node['id']}: '{kind}' is not a node this ComfyUI has")
        inputs = widget_values_by_name(node, object_info[kind])
        for slot in node.get("inputs", []):
            link_id = slot.get("link")
            if link_id is None:
                continue
            _, origin_id, origin_slot, *_ = links[link_id]
            inputs[slot["name"]] = [str(origin_id), origin_slot]
        prompt[str(node["id"])] = {"class_type": kind, "inputs": inputs}
    return prompt


def widget_values_by_name(node: dict, node_info: dict) -> dict:
    values = node.get("widgets_values") or []
    if isinstance(values, dict):        # some front-end versions save a name -> value mapping
        return {name: values[name] for name, _, _ in widget_inputs(node_info, node) if name in values}
    by_name, position = {}, 0
    for name, kind, options in widget_inputs(node_info, node):
        if position >= len(values):
            raise WorkflowError(f"node {node['id']} ({node['type']}): no saved value for widget '{name}' — "
                                "the workflow is older than the node; re-save it")
        if not options.get("forceInput"):   # a socket with no link is simply not an input
            by_name[name] = values[position]
        position += 1
        if has_control_widget(name, kind, options) and position < len(values) and values[position] in CONTROL_VALUES:
            position += 1
    return by_name


def count_widget_values(node_info: dict, node: dict | None = None) -> int:
    """How many widgets_values a freshly saved node of this type has (control widgets included)."""
    return sum(1 + has_control_widget(*widget) for widget in widget_inputs(node_info, node))


# --- running a bundled workflow quickly -------------------------------------------------------------
# What tests change before running a bundled workflow on a CPU with random weights: step counts and
# picture sizes only (plus the model files, which the tests name). Keyed by (class_type, input).
QUICK_RUN_VALUES = {
    ("LoraLabTrainLora", "resolution"): 64,
    ("LoraLabTrainLora", "steps"): 2,
    ("LoraLabDatasetFromFolder", "target_steps"): 2,
    ("LoraLabDatasetPreview", "resolution"): 64,
    ("LoraLabDatasetPreview", "thumbnail_size"): 64,
    ("LoraLabCaption", "num_beams"): 1,
    ("LoraLabCaption", "min_length"): 2,
    ("LoraLabCaption", "max_length"): 8,
    ("LoraLabTrainingOptions", "save_every_n_steps"): 0,
    ("LoraLabTrainingOptions", "preview_every_n_steps"): 1,
    ("LoraLabTrainingOptions", "preview_steps"): 1,
    ("LoraLabSaveOptions", "save_every_n_steps"): 0,
    ("LoraLabPreviewOptions", "preview_every_n_steps"): 1,
    ("LoraLabPreviewOptions", "preview_steps"): 1,
    ("KSampler", "steps"): 1,
    ("EmptyLatentImage", "width"): 64,
    ("EmptyLatentImage", "height"): 64,
    ("LoraLabLoraCompareGrid", "steps"): 1,
    ("LoraLabLoraCompareGrid", "width"): 64,
    ("LoraLabLoraCompareGrid", "height"): 64,
}


def with_values(prompt: dict, values: dict) -> dict:
    """A copy of ``prompt`` with each (class_type, input) in ``values`` set wherever it occurs."""
    patched = {}
    for node_id, entry in prompt.items():
        inputs = dict(entry["inputs"])
        for (kind, name), value in values.items():
            if entry["class_type"] == kind and name in inputs and not isinstance(inputs[name], list):
                inputs[name] = value
        patched[node_id] = {"class_type": entry["class_type"], "inputs": inputs}
    return patched
