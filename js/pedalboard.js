// LoRA Pedalboard rows editor: a DOM widget (canvas-drawn widgets break in ComfyUI's Vue renderer, where
// vue_nodes_host.js puts it into the node).
// The node's `pedals` STRING widget stays the single source of truth: it is hidden, every edit writes
// its JSON back, and whatever sets it (loading a workflow, an API prompt, undo, paste) re-renders the rows.
// So saving, reloading and API export carry the rows with no help from this file.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { DOM_MARGIN, domArea } from "./dom_widgets.js";
import { element, hideWidget, watchValue } from "./value_widget.js";
import { STRENGTH_LIMIT, STRENGTH_STEP, addRow, loraOptions, moveRow, parseRows, removeRow, rowIsActive, serializeRows, setRowField, trainedTagsText, triggerText } from "./pedal_rows.js";

const NODE = "LoraLabPedalboard";
const VALUE_WIDGET = "pedals";
const BOARD_WIDGET = "loralab_pedalboard";
const ROW_HEIGHT = 46;          // controls line + trigger-words line
const STATUS_LINES = 4;         // what the last run applied: one line per LoRA + trigger words; more scroll
const STATUS_HEIGHT = STATUS_LINES * 15 + 6;
const BLOCKS_TITLE = "Block weights: this LoRA's strength per block. A preset (ALL, NONE, INS, IND, INALL, MIDD, OUTD, " +
  "OUTS, OUTALL, MOUT; Flux: DBL-ALL, SINGLE-ALL, …) or one number per block, BASE first: SD1.5 17 (LyCORIS 26/27), " +
  "SDXL 12 (20/21), Flux 20/58. Blocks the LoRA lacks are skipped, never shifting the rest. Empty: the whole LoRA.";
const CHROME_HEIGHT = 16 + 26 + STATUS_HEIGHT + 3 * 3;     // column labels, buttons, status, gaps

// --- server lookups, shared by every pedalboard on the page -------------------------------------------
let loraNames = null;           // Promise<string[]>
const loraInfo = new Map();     // name -> Promise<info>

function fetchLoraNames(refresh = false) {
  if (refresh || !loraNames) {
    if (refresh) loraInfo.clear();
    loraNames = api.fetchApi("/loralab/loras", { cache: "no-store" })
      .then((response) => (response.ok ? response.json() : Promise.reject(new Error(`HTTP ${response.status}`))))
      .catch((error) => {
        loraNames = null;       // try again next time instead of remembering the failure
        throw error;
      });
  }
  return loraNames;
}

function fetchLoraInfo(name) {
  if (!loraInfo.has(name)) {
    const request = api.fetchApi(`/loralab/lora_info?name=${encodeURIComponent(name)}`, { cache: "no-store" })
      .then((response) => response.json().catch(() => ({ error: `HTTP ${response.status}` })))
      .catch((error) => ({ error: String(error) }))
      .then((info) => {
        // Only answers are kept (until Refresh): a failed lookup is asked again next time.
        if (info?.error && loraInfo.get(name) === request) loraInfo.delete(name);
        return info;
      });
    loraInfo.set(name, request);
  }
  return loraInfo.get(name);
}

// Named boards (nodes/board_presets.py): the rows saved under a name in ComfyUI's user folder.
async function answer(response) {
  const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok || body?.error) throw new Error(body?.error || `HTTP ${response.status}`);
  return body;
}

const boardNames = () => api.fetchApi("/loralab/boards", { cache: "no-store" }).then(answer);
const loadBoard = (name) => api.fetchApi(`/loralab/boards/load?name=${encodeURIComponent(name)}`,
                                         { cache: "no-store" }).then(answer);
const saveBoard = (name, rows) => api.fetchApi("/loralab/boards/save", {
  method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ name, rows }),
}).then(answer);

// --- the board ----------------------------------------------------------------------------------------
function strengthInput(value, field, title) {
  return element("input", {
    type: "number", min: -STRENGTH_LIMIT, max: STRENGTH_LIMIT, step: STRENGTH_STEP, value: String(value), title,
    className: "loralab-pedal-strength", dataset: { field },
    style: "width:58px;background:#222;color:#ddd;border:1px solid #555;border-radius:3px;padding:1px 2px;",
  });
}

function button(text, action, title) {
  return element("button", {
    textContent: text, title, className: "loralab-pedal-button", dataset: { action },
    style: "background:#333;color:#ddd;border:1px solid #555;border-radius:3px;padding:0 5px;cursor:pointer;",
  });
}

class Pedalboard {
  constructor(node, valueWidget) {
    this.node = node;
    this.valueWidget = valueWidget;
    this.rows = [];
    this.error = null;
    this.names = [];
    this.written = null;        // the last JSON this editor wrote, to tell our writes from others'
    this.report = "";

    this.list = element("div", {
      className: "loralab-pedal-rows", style: "display:flex;flex-direction:column;gap:2px;flex:1;min-height:0;overflow-y:auto;",
    });
    // A fixed-height status (the run's report scrolls inside it), so a run never grows the node.
    this.status = element("div", {
      className: "loralab-pedal-status",
      style: `box-sizing:border-box;flex:none;height:${STATUS_HEIGHT}px;overflow-y:auto;font:11px/15px monospace;` +
             "color:#aaa;white-space:pre-wrap;background:#1b1b1b;border-radius:3px;padding:3px 5px;",
    });
    const header = element("div", { style: "display:flex;gap:4px;font:10px sans-serif;color:#999;padding-left:20px;" },
      element("span", { textContent: "LoRA", style: "flex:1;" }),
      element("span", { textContent: "model", style: "width:62px;" }),
      element("span", { textContent: "clip", style: "width:62px;" }),
      element("span", { textContent: "", style: "width:78px;" }));
    this.boards = element("select", {
      className: "loralab-board-list", title: "Load a saved board: its rows replace these",
      style: "min-width:0;max-width:150px;background:#222;color:#ddd;border:1px solid #555;border-radius:3px;",
    });
    this.boards.addEventListener("change", () => this.recall(this.boards.value));
    const footer = element("div", { style: "display:flex;gap:4px;" },
      button("+ Add LoRA", "add", "Add a row at the bottom"),
      button("⟳", "refresh", "Reload the list of LoRA files from the server"),
      element("span", { style: "flex:1;" }),
      this.boards,
      button("Save board…", "save-board", "Save these rows under a name, to load in any workflow"));
    this.root = element("div", {
      className: "loralab-pedalboard",
      style: "box-sizing:border-box;display:flex;flex-direction:column;gap:3px;width:100%;height:100%;" +
             "overflow:hidden;font:12px sans-serif;color:#ddd;",
    }, header, this.list, footer, this.status);

    this.root.addEventListener("change", (event) => this.onChange(event));
    this.root.addEventListener("click", (event) => this.onClick(event));
    // Keys typed into the board are for its inputs, not for the canvas's shortcuts (Delete removes nodes).
    this.root.addEventListener("keydown", (event) => {
      if (["INPUT", "SELECT"].includes(event.target?.tagName)) event.stopPropagation();
    });

    // Its height follows the rows (the rows travel in `pedals`; this widget is never saved).
    this.widget = domArea(node, BOARD_WIDGET, this.root, () => this.height());
    this.widget.loralab_board = this;

    watchValue(valueWidget, (value) => {
      if (value !== this.written) queueMicrotask(() => this.load());
    });
    this.load();
    this.refreshNames(false);
    this.listBoards();
  }

  async listBoards() {
    let names = [];
    try {
      names = await boardNames();
    } catch (error) {
      this.boardNote = `could not list saved boards (${error.message})`;
    }
    this.boards.replaceChildren(
      element("option", { value: "", textContent: names.length ? "Saved boards…" : "No saved boards" }),
      ...names.map((name) => element("option", { value: name, textContent: name })));
    this.boards.value = "";
  }

  async recall(name) {
    if (!name) return;
    try {
      const board = await loadBoard(name);
      this.commit(parseRows(JSON.stringify(board.rows)).rows);
      this.lastBoard = board.name;
      this.boardNote = `Loaded the board '${board.name}' (${plural(board.rows.length, "row")}).`;
    } catch (error) {
      this.boardNote = `could not load '${name}': ${error.message}`;
    }
    this.boards.value = "";
    this.render();
  }

  async saveAs() {
    const name = window.prompt("Save this board as:", this.lastBoard || "")?.trim();
    if (!name) return;
    try {
      const saved = await saveBoard(name, this.rows);
      this.lastBoard = saved.name;
      this.boardNote = `${saved.replaced ? "Replaced" : "Saved"} the board '${saved.name}' (${plural(saved.rows, "row")}).`;
      await this.listBoards();
    } catch (error) {
      this.boardNote = `could not save '${name}': ${error.message}`;
    }
    this.render();
  }

  height() {
    return CHROME_HEIGHT + Math.max(1, this.rows.length) * ROW_HEIGHT;
  }

  load() {
    const { rows, error } = parseRows(this.valueWidget.value);
    this.rows = rows;
    this.error = error;
    this.render();
  }

  commit(rows, rerender = true) {
    this.rows = rows;
    this.error = null;
    this.written = serializeRows(rows);
    this.valueWidget.value = this.written;
    this.valueWidget.callback?.(this.written);
    if (rerender) this.render();
    this.node.graph?.change?.();            // marks the workflow modified (and undoable in new front ends)
  }

  async refreshNames(refresh) {
    try {
      this.names = await fetchLoraNames(refresh);
      this.namesError = null;
    } catch (error) {
      this.namesError = `could not list LoRAs (${error.message})`;
    }
    this.render();
  }

  onChange(event) {
    const control = event.target;
    const index = Number(control.closest("[data-index]")?.dataset.index);
    const field = control.dataset?.field;
    if (!field || !Number.isInteger(index)) return;
    const value = field === "on" ? control.checked : control.value;
    const rows = setRowField(this.rows, index, field, value);
    if (field === "lora") {
      this.commit(rows);                    // a new LoRA needs its trigger words: redraw the rows
      return;
    }
    // Switches and strengths redraw only their row's look, so focus and the spinner stay under the mouse.
    this.commit(rows, false);
    if (field !== "on") control.value = String(rows[index][field] ?? "");     // shows the clamped value
    const rowElement = control.closest("[data-index]");
    if (rowElement) rowElement.style.opacity = rowIsActive(rows[index]) ? "1" : "0.55";
  }

  onClick(event) {
    const action = event.target?.closest?.("[data-action]")?.dataset.action;
    if (!action) return;
    event.preventDefault();
    const index = Number(event.target.closest("[data-index]")?.dataset.index);
    if (action === "add") this.commit(addRow(this.rows));
    else if (action === "refresh") {
      this.refreshNames(true);
      this.listBoards();
    } else if (action === "save-board") this.saveAs();
    else if (action === "remove") this.commit(removeRow(this.rows, index));
    else if (action === "up") this.commit(moveRow(this.rows, index, -1));
    else if (action === "down") this.commit(moveRow(this.rows, index, +1));
  }

  renderRow(row, index) {
    const select = element("select", {
      className: "loralab-pedal-lora", dataset: { field: "lora" }, title: row.lora,
      style: "flex:1;min-width:60px;background:#222;color:#ddd;border:1px solid #555;border-radius:3px;",
    });
    for (const option of loraOptions(this.names, row.lora)) {
      select.append(element("option", { value: option.value, textContent: option.label, selected: option.value === row.lora }));
    }
    select.value = row.lora;
    const words = element("div", {
      className: "loralab-pedal-trigger",
      style: "flex:1;min-width:0;font:10px monospace;color:#8a8;white-space:nowrap;overflow:hidden;text-overflow:ellipsis;",
    });
    const blocks = element("input", {
      type: "text", value: row.blocks ?? "", placeholder: "blocks: all", className: "loralab-pedal-blocks",
      dataset: { field: "blocks" }, spellcheck: false, title: BLOCKS_TITLE,
      style: "width:136px;font:10px monospace;background:#222;color:#ddd;border:1px solid #444;border-radius:3px;padding:0 3px;",
    });
    if (row.lora) {
      fetchLoraInfo(row.lora).then((info) => {
        words.textContent = triggerText(info);
        words.title = [words.textContent, trainedTagsText(info)].filter(Boolean).join("\n");   // hover: what it learned
      });
    }
    const controls = element("div", { style: "display:flex;gap:4px;align-items:center;" },
      element("input", { type: "checkbox", checked: row.on, title: "On / off", className: "loralab-pedal-on", dataset: { field: "on" } }),
      select,
      strengthInput(row.strength_model, "strength_model", "Model strength (-10…10)"),
      strengthInput(row.strength_clip, "strength_clip", "CLIP strength (-10…10)"),
      button("▲", "up", "Move up"), button("▼", "down", "Move down"), button("✕", "remove", "Remove this row"));
    return element("div", {
      className: "loralab-pedal-row", dataset: { index: String(index) },
      style: `display:flex;flex-direction:column;gap:1px;opacity:${rowIsActive(row) ? 1 : 0.55};`,
    }, controls, element("div", { style: "display:flex;gap:4px;align-items:center;padding-left:20px;" }, words, blocks));
  }

  render() {
    this.list.replaceChildren(...this.rows.map((row, index) => this.renderRow(row, index)));
    if (!this.rows.length) {
      this.list.append(element("div", { textContent: "No LoRA yet: press + Add LoRA.", style: "color:#888;padding:8px 20px;" }));
    }
    const problems = [this.error && `${this.error}; the saved value is kept until you edit the rows`, this.namesError];
    this.status.textContent = problems.filter(Boolean).join("\n")
      || [this.boardNote, this.report].filter(Boolean).join("\n") || "Queue to apply the rows.";
    this.status.title = this.status.textContent;
    this.status.style.color = problems.some(Boolean) ? "#e88" : "#aaa";
    this.resize();
  }

  resize() {
    // Grow the node when rows are added (never shrink what the user sized). Before the first draw the
    // board's top is unknown: estimate it from the slots and the two trained-strength widgets.
    const node = this.node;
    const slots = Math.max(node.inputs?.length ?? 0, node.outputs?.length ?? 0);
    const top = this.widget.last_y || this.widget.y || slots * 20 + 2 * 24 + 10;
    const needed = top + this.height() + 2 * DOM_MARGIN + 6;
    if (node.size && node.size[1] < needed) node.setSize?.([node.size[0], needed]);
    node.setDirtyCanvas?.(true, true);
  }

  showReport(text) {
    this.report = text;
    this.render();
  }
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function boardOf(node) {
  const existing = node.widgets?.find((w) => w.name === BOARD_WIDGET);
  if (existing) return existing.loralab_board;
  const valueWidget = node.widgets?.find((w) => w.name === VALUE_WIDGET);
  if (!valueWidget) return null;         // pedals converted to an input: the rows come from elsewhere
  hideWidget(valueWidget);
  return new Pedalboard(node, valueWidget);
}

app.registerExtension({
  name: "LoRALab.pedalboard",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      const board = boardOf(this);
      if (board && this.size) {
        this.setSize?.([Math.max(this.size[0], 440), this.size[1]]);
        board.resize();
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      boardOf(this)?.load();     // a loaded workflow's rows, even if the value was set before the watch
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const text = message?.text;
      if (text?.length) boardOf(this)?.showReport(Array.isArray(text) ? text.join("\n") : String(text));
      return result;
    };
  },
});
