"""Every node has a help page for the new front end's node library, and the front end can fetch it.

ComfyUI's front end (1.27 on) shows a custom node's help from ``/extensions/<pack>/docs/<NodeClassId>/<locale>.md``,
falling back to ``/extensions/<pack>/docs/<NodeClassId>.md`` (``fetchCustomNodeHelp`` in its bundle);
``/extensions/<pack>/`` serves the pack's WEB_DIRECTORY, ``js/``. So the pages are ``js/docs/<NodeClassId>.md``.
Each page names every input a user can set or connect (hidden ones are not the user's) in its Inputs section,
every output in its Outputs section, and no name the node does not have in the first column of those tables.
"""
from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest

import comfyui_home

DOCS = comfyui_home.REPO / "js" / "docs"
MAX_LINES = 100          # the help opens in a side panel: a page is read there, not scrolled through
NAME = re.compile(r"`([^`]+)`")


@pytest.fixture(scope="module")
def nodes(pack) -> dict:
    return pack.NODE_CLASS_MAPPINGS


@pytest.fixture(scope="module")
def paged(nodes) -> dict:
    """The nodes that have a page (a missing page is test_every_node_has_a_page's failure, not every test's)."""
    return {node_id: cls for node_id, cls in nodes.items() if (DOCS / f"{node_id}.md").is_file()}


def inputs_of(cls) -> list[str]:
    spec = cls.INPUT_TYPES()
    return [*spec.get("required", {}), *spec.get("optional", {})]


def outputs_of(cls) -> list[str]:
    return list(getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES)


def page(node_id: str) -> str:
    return (DOCS / f"{node_id}.md").read_text(encoding="utf-8")


def section(text: str, heading: str) -> str:
    """The text under ``## heading`` up to the next ``## `` heading ("" when there is no such section)."""
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, flags=re.M | re.S)
    return match.group(1) if match else ""


def first_cells(text: str) -> list[str]:
    """The first cell of every body row of the markdown tables in ``text`` (header and rule rows left out)."""
    cells = []
    lines = text.splitlines()
    for index, line in enumerate(lines):
        if not line.startswith("|") or re.fullmatch(r"\|[\s|:-]+\|?", line):
            continue
        if index + 1 < len(lines) and re.fullmatch(r"\|[\s|:-]+\|?", lines[index + 1]):
            continue        # a header row: the rule row follows it
        cells.append(line.split("|")[1])
    return cells


def title(display_name: str) -> str:
    """'Train LoRA (LoRA Lab)' -> 'Train LoRA'; '… (deprecated, LoRA Lab)' -> '… (deprecated)'."""
    return re.sub(r"\s*\(LoRA Lab\)$", "", display_name).replace(", LoRA Lab)", ")")


def test_every_node_has_a_page(nodes):
    missing = sorted(node_id for node_id in nodes if not (DOCS / f"{node_id}.md").is_file())
    assert not missing, f"no help page js/docs/<id>.md for {missing}"


def test_no_page_for_a_node_that_does_not_exist(nodes):
    pages = {path.stem for path in DOCS.glob("*.md")} | {path.name for path in DOCS.iterdir() if path.is_dir()}
    assert pages <= set(nodes), f"help pages for nodes the pack does not have: {sorted(pages - set(nodes))}"


def test_each_page_names_every_input_and_output(paged):
    problems = []
    for node_id, cls in paged.items():
        text = page(node_id)
        named_inputs = set(NAME.findall(section(text, "Inputs")))
        named_outputs = set(NAME.findall(section(text, "Outputs")))
        problems += [f"{node_id}: input `{name}` is not in its Inputs section"
                     for name in inputs_of(cls) if name not in named_inputs]
        problems += [f"{node_id}: output `{name}` is not in its Outputs section"
                     for name in outputs_of(cls) if name not in named_outputs]
    assert not problems, "\n".join(problems)


def test_pages_name_no_input_or_output_the_node_does_not_have(paged):
    """The first column of the Inputs and Outputs tables holds the node's own names, nothing invented."""
    problems = []
    for node_id, cls in paged.items():
        text = page(node_id)
        for heading, real in (("Inputs", set(inputs_of(cls))), ("Outputs", set(outputs_of(cls)))):
            for cell in first_cells(section(text, heading)):
                problems += [f"{node_id}: {heading} table names `{name}`, which the node does not have"
                             for name in NAME.findall(cell) if name not in real]
    assert not problems, "\n".join(problems)


def test_pages_have_the_shape_of_a_help_page(paged, pack):
    """Title as the node library shows it, the sections a reader looks for, short enough for the side panel."""
    problems = []
    for node_id in paged:
        text = page(node_id)
        expected = f"# {title(pack.NODE_DISPLAY_NAME_MAPPINGS[node_id])}"
        if text.splitlines()[0] != expected:
            problems.append(f"{node_id}: first line {text.splitlines()[0]!r}, expected {expected!r}")
        problems += [f"{node_id}: no '## {heading}' section" for heading in ("Inputs", "Outputs", "Tips")
                     if not section(text, heading).strip()]
        if "**Typical use" not in text:
            problems.append(f"{node_id}: no 'Typical use' line")
        if len(text.splitlines()) > MAX_LINES:
            problems.append(f"{node_id}: {len(text.splitlines())} lines, more than {MAX_LINES}")
    assert not problems, "\n".join(problems)


@pytest.mark.server
def test_front_end_fetches_the_help_page_from_a_real_server(server):
    """The URL the front end builds: the pack name from the node's python_module (when this ComfyUI reports
    one; else the folder name, which is the same), the locale page first (absent), then the fallback."""
    info = server.get_json("/object_info/LoraLabTrainLora")["LoraLabTrainLora"]
    module = info.get("python_module")
    if module:
        assert module.split(".")[0] == "custom_nodes", module
        pack_name = module.split(".")[1].split("@")[0]          # extractCustomNodeName + normalizePackId
        assert pack_name == comfyui_home.PACK_LINK_NAME
    else:
        pack_name = comfyui_home.PACK_LINK_NAME
    base = f"{server.url}/extensions/{pack_name}/docs/LoraLabTrainLora"

    with pytest.raises(urllib.error.HTTPError) as no_locale_page:
        urllib.request.urlopen(f"{base}/en.md", timeout=30)
    assert no_locale_page.value.code == 404

    with urllib.request.urlopen(f"{base}.md", timeout=30) as response:
        assert response.status == 200
        body = response.read().decode("utf-8")
    assert body == page("LoraLabTrainLora")
    assert body.startswith("# Train LoRA")
