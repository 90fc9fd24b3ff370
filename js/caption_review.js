// Review Captions editor: every picture of the last run beside its caption, editable in place, with
// find/replace, add/remove a tag, trigger word first and a tag filter. Bulk edits apply to the pictures shown.
//
// The node's `reviewed` STRING widget holds the edited captions (hidden; see value_widget.js), so the edits
// travel with the workflow and the server applies them each run. The pictures come from the server by the
// run's session token (nodes/review.py): the editor never names a file, and saving writes only the caption
// files of the dataset that run read.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { darkBox, domArea, fitNodeToWidgets } from "./dom_widgets.js";
import { element, hideWidget, watchValue } from "./value_widget.js";
import { FILTERS, addTags, editAll, findReplace, isEdited, missingKeys, parseReviewed, putTriggerFirst, removeTags, serializeReviewed, shownCaption, shownPictures, undoEdit, withCaption } from "./caption_edits.js";

const NODE = "LoraLabReviewCaptions";
const VALUE_WIDGET = "reviewed";
const EDITOR_WIDGET = "loralab_review";
const SESSION_PROPERTY = "loralab_review_session";
const AREA_HEIGHT = 600;        // toolbar 3 × 26, list, footer 26, status 4 lines
const STATUS_HEIGHT = 4 * 15 + 6;
const THUMB = 96;
const NODE_WIDTH = 620;
const UNDO_LIMIT = 50;
const FILTER_LABELS = { all: "all pictures", with: "with tag(s)", without: "without tag(s)", edited: "edited here" };

const INPUT_STYLE = "background:#222;color:#ddd;border:1px solid #555;border-radius:3px;padding:2px 4px;min-width:0;";
const BUTTON_STYLE = "background:#333;color:#ddd;border:1px solid #555;border-radius:3px;padding:1px 7px;cursor:pointer;white-space:nowrap;";

function input(name, placeholder, title, width = "") {
  return element("input", { type: "text", placeholder, title, className: `loralab-review-${name}`,
                            style: INPUT_STYLE + (width ? `width:${width};flex:none;` : "flex:1;") });
}

function button(text, action, title) {
  return element("button", { textContent: text, title, className: `loralab-review-button`, dataset: { action },
                             style: BUTTON_STYLE });
}

function row(...children) {
  return element("div", { style: "display:flex;gap:4px;align-items:center;flex:none;height:22px;" }, ...children);
}

class CaptionReview {
  constructor(node, valueWidget) {
    this.node = node;
    this.valueWidget = valueWidget;
    this.pictures = [];             // [{key, caption}] as the last run received them
    this.reviewed = {};             // {key: caption}: the edits, as the value widget holds them
    this.session = null;
    this.canSave = false;
    this.folder = null;
    this.undo = [];
    this.written = null;            // the last value this editor wrote, to tell our writes from others'
    this.message = "Queue the graph to list the pictures here.";
    this.problem = false;
    this.report = "";

    this.filterMode = element("select", { className: "loralab-review-filter-mode", title: "Which pictures to show",
                                          style: INPUT_STYLE + "flex:none;" });
    for (const mode of FILTERS) this.filterMode.append(element("option", { value: mode, textContent: FILTER_LABELS[mode] }));
    this.filterTags = input("filter", "tag, tag…", "Show the pictures that have every one of these tags (or none of them)");
    this.count = element("span", { className: "loralab-review-count", style: "flex:none;color:#999;font-size:11px;" });
    this.find = input("find", "find", "Text to replace in the shown captions (case-sensitive)");
    this.replace = input("replace", "replace with", "What it becomes (may be empty)");
    this.tag = input("tag", "tag(s)", "Tags to add at the end of, or remove from, the shown captions", "");
    this.trigger = input("trigger", "trigger word", "Put this first in the shown captions, once", "120px");
    this.list = element("div", { className: "loralab-review-list",
                                 style: "flex:1;min-height:0;overflow-y:auto;display:flex;flex-direction:column;gap:3px;" });
    this.status = element("div", { className: "loralab-review-status",
      style: `box-sizing:border-box;flex:none;height:${STATUS_HEIGHT}px;overflow-y:auto;white-space:pre-wrap;` +
             "font:11px/15px monospace;color:#aaa;background:#1b1b1b;border-radius:3px;padding:3px 5px;" });
    this.saveButton = button("Save caption files", "save", "Write the captions shown (all pictures) as .txt files next to the pictures; replaced files are backed up");
    this.root = element("div", { className: "loralab-review",
      style: "box-sizing:border-box;display:flex;flex-direction:column;gap:3px;width:100%;height:100%;overflow:hidden;" +
             "font:12px sans-serif;color:#ddd;" },
      row(element("span", { textContent: "Show", style: "color:#999;" }), this.filterMode, this.filterTags, this.count),
      row(this.find, this.replace, button("Replace", "replace", "Replace in the shown captions")),
      row(this.tag, button("Add tag", "add", "Add at the end of the shown captions that lack it"),
          button("Remove tag", "remove", "Remove from the shown captions"), this.trigger,
          button("Trigger first", "trigger", "Put the trigger word first in the shown captions")),
      this.list,
      row(this.saveButton, button("Undo", "undo", "Undo the last replace, add, remove, trigger or forget"),
          button("Forget edits", "forget", "Drop every edit made here: captions go back to what arrives from upstream"),
          element("span", { style: "flex:1;" })),
      this.status);

    this.root.addEventListener("click", (event) => this.onClick(event));
    // Typing stores each keystroke (so a queue right after uses it); leaving the box tidies the caption the way
    // the server reads it (one line, single spaces).
    this.root.addEventListener("input", (event) => this.onTyped(event.target, false));
    this.root.addEventListener("change", (event) => this.onTyped(event.target, true));
    this.filterMode.addEventListener("change", () => this.render());
    this.filterTags.addEventListener("input", () => this.render());
    // Keys typed here are for the editor, not for the canvas's shortcuts (Delete removes nodes, Ctrl+A selects all).
    this.root.addEventListener("keydown", (event) => {
      if (["INPUT", "SELECT", "TEXTAREA"].includes(event.target?.tagName)) event.stopPropagation();
    });

    this.widget = domArea(node, EDITOR_WIDGET, this.root, AREA_HEIGHT);
    this.widget.loralab_review = this;
    watchValue(valueWidget, (value) => {
      if (value !== this.written) queueMicrotask(() => this.load());
    });
    this.load();
  }

  load() {
    const { captions, error } = parseReviewed(this.valueWidget.value);
    this.reviewed = captions;
    this.undo = [];                 // set from outside (a loaded workflow, ComfyUI's own undo): ours no longer applies
    this.valueError = error;
    this.render();
  }

  commit(reviewed, { rerender = true, undo = null } = {}) {
    // `undo`: the entries this change replaced ({key: caption or undefined}); Undo puts those back only.
    if (undo && Object.keys(undo).length) this.undo = [...this.undo.slice(1 - UNDO_LIMIT), undo];
    this.reviewed = reviewed;
    this.valueError = null;
    this.written = serializeReviewed(reviewed);
    this.valueWidget.value = this.written;
    this.valueWidget.callback?.(this.written);
    if (rerender) this.render();
    else this.renderCounts();
    this.node.graph?.change?.();          // marks the workflow modified (and undoable in new front ends)
  }

  async open(session, report = "") {
    this.session = session;
    this.node.properties ??= {};
    this.node.properties[SESSION_PROPERTY] = session;
    if (report) this.report = report;
    if (!session) return this.render();
    try {
      const response = await api.fetchApi(`/loralab/review/pictures?session=${encodeURIComponent(session)}`, { cache: "no-store" });
      const body = await response.json();
      if (!response.ok) throw new Error(body?.error ?? `HTTP ${response.status}`);
      if (this.session !== session) return;           // a newer run answered first
      this.pictures = body.pictures;
      this.canSave = body.can_save;
      this.folder = body.folder;
      this.message = "";
      this.problem = false;
    } catch (error) {
      this.pictures = [];
      this.message = error.message;
      this.problem = !/no longer on the server/.test(error.message);
    }
    this.render();
  }

  thumbURL(index) {
    return api.apiURL(`/loralab/review/thumb?session=${encodeURIComponent(this.session)}&index=${index}`);
  }

  shown() {
    return shownPictures(this.pictures, this.reviewed, this.filterMode.value, this.filterTags.value);
  }

  onClick(event) {
    const action = event.target?.closest?.("[data-action]")?.dataset.action;
    if (!action) return;
    event.preventDefault();
    const shown = this.shown();
    const bulk = {
      replace: () => this.find.value && ((caption) => findReplace(caption, this.find.value, this.replace.value)),
      add: () => this.tag.value.trim() && ((caption) => addTags(caption, this.tag.value)),
      remove: () => this.tag.value.trim() && ((caption) => removeTags(caption, this.tag.value)),
      trigger: () => this.trigger.value.trim() && ((caption) => putTriggerFirst(caption, this.trigger.value)),
    }[action]?.();
    if (bulk !== undefined) {
      if (!bulk) return this.say(action === "replace" ? "Type the text to find first." : "Type the tag(s) first.", true);
      const { reviewed, changed, undo } = editAll(shown, this.reviewed, bulk);
      this.commit(reviewed, { undo });
      return this.say(`${changed} of ${shown.length} shown caption(s) changed.` + (changed ? " Undo takes it back." : ""));
    }
    if (action === "revert") {
      const picture = this.pictures.find((p) => p.key === event.target.closest("[data-key]")?.dataset.key);
      if (picture) this.commit(withCaption(this.reviewed, picture, picture.caption), { undo: { [picture.key]: this.reviewed[picture.key] } });
    } else if (action === "undo") {
      if (!this.undo.length) return this.say("Nothing to undo here (typing in a caption has its own Ctrl+Z).");
      const last = this.undo.at(-1);
      this.undo = this.undo.slice(0, -1);
      this.commit(undoEdit(this.reviewed, last));
      this.say(`Undone (${Object.keys(last).length} caption(s)); edits typed since are kept.`);
    } else if (action === "forget") {
      this.commit({}, { undo: { ...this.reviewed } });
      this.say("Every edit made here is dropped; the captions are what arrives from upstream. Undo brings them back.");
    } else if (action === "save") {
      this.save();
    }
  }

  onTyped(box, leaving) {
    if (box?.tagName !== "TEXTAREA") return;
    const row = box.closest("[data-key]");
    const picture = this.pictures.find((p) => p.key === row?.dataset.key);
    if (!picture) return;
    if (leaving) box.value = box.value.replace(/\s+/g, " ").trim();
    this.commit(withCaption(this.reviewed, picture, box.value), { rerender: false });   // redraws the counts
    this.paintMark(row, picture);                                                     // and this row's mark only
  }

  async save() {
    if (!this.session || !this.pictures.length) return this.say("Queue the graph first: there is nothing to save yet.", true);
    if (!this.canSave) {
      return this.say("This dataset came from an IMAGE batch: there are no picture files to save caption files next " +
                      "to. Your edits are kept in the workflow and used when it runs.", true);
    }
    const captions = Object.fromEntries(this.pictures.map((p) => [p.key, shownCaption(p, this.reviewed)]));
    this.saveButton.disabled = true;
    this.say("Saving…");
    try {
      const response = await api.fetchApi("/loralab/review/save", {
        method: "POST", headers: { "Content-Type": "application/json" },
        body: JSON.stringify({ session: this.session, captions }),
      });
      const body = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
      if (!response.ok) throw new Error(body.error ?? `HTTP ${response.status}`);
      const total = body.written + body.replaced + body.unchanged;
      this.say(`Saved ${total} caption file(s) in ${this.folder}: ${body.written} new, ${body.replaced} replaced ` +
               `(old text backed up), ${body.unchanged} already so.` + (body.not_saved ? ` ${body.not_saved} not saved:` : "") +
               `\n${body.report}\nQueue again: the dataset node re-reads the files.`, body.not_saved > 0);
    } catch (error) {
      this.say(`Not saved: ${error.message}`, true);
    } finally {
      this.saveButton.disabled = false;
    }
  }

  say(text, problem = false) {
    this.report = text;
    this.reportProblem = problem;
    this.renderStatus();
  }

  paintMark(rowElement, picture) {
    const edited = isEdited(picture, this.reviewed);
    rowElement.querySelector(".loralab-review-mark").style.visibility = edited ? "visible" : "hidden";
    rowElement.style.borderLeftColor = edited ? "#d9a441" : "transparent";
  }

  renderRow(picture) {
    const index = this.pictures.indexOf(picture);
    const caption = element("textarea", { className: "loralab-review-caption", value: shownCaption(picture, this.reviewed),
      spellcheck: false, title: picture.key,
      style: darkBox("flex:1;height:auto;resize:none;padding:2px 4px;font:12px/1.35 sans-serif;") });
    const name = element("div", { style: "display:flex;gap:6px;align-items:center;font:10px monospace;color:#999;" },
      element("span", { textContent: picture.key, style: "overflow:hidden;text-overflow:ellipsis;white-space:nowrap;" }),
      element("span", { className: "loralab-review-mark", textContent: "● edited", style: "color:#d9a441;flex:none;" },
              button("↺", "revert", "Back to the caption that arrived from upstream")));
    const thumb = element("img", { className: "loralab-review-thumb", loading: "lazy", decoding: "async", alt: picture.key,
      src: this.thumbURL(index), style: `width:${THUMB}px;height:${THUMB}px;object-fit:contain;flex:none;background:#111;border-radius:3px;` });
    const rowElement = element("div", { className: "loralab-review-row", dataset: { key: picture.key },
      style: "display:flex;gap:6px;border-left:3px solid transparent;padding-left:3px;flex:none;" },
      thumb, element("div", { style: `flex:1;min-width:0;display:flex;flex-direction:column;gap:2px;height:${THUMB}px;` }, name, caption));
    this.paintMark(rowElement, picture);      // render() counts the rows once, after all of them
    return rowElement;
  }

  render() {
    if (!this.pictures.length) {
      this.list.replaceChildren(element("div", { textContent: this.message || "This dataset has no pictures.",
        style: `padding:12px;color:${this.problem ? "#e88" : "#888"};white-space:pre-wrap;` }));
    } else {
      const scroll = this.list.scrollTop;
      this.list.replaceChildren(...this.shown().map((picture) => this.renderRow(picture)));
      this.list.scrollTop = scroll;
    }
    this.saveButton.disabled = !this.canSave;
    this.renderCounts();
    this.renderStatus();
  }

  renderCounts() {
    const edited = this.pictures.filter((p) => isEdited(p, this.reviewed)).length;
    const shown = this.list.querySelectorAll(".loralab-review-row").length;
    this.count.textContent = this.pictures.length ? `${shown} of ${this.pictures.length} · ${edited} edited` : "";
  }

  renderStatus() {
    const notes = [];
    if (this.valueError) notes.push(`The saved edits cannot be read (${this.valueError}); they are kept until you edit.`);
    const missing = this.pictures.length ? missingKeys(this.reviewed, this.pictures) : [];
    if (missing.length) notes.push(`${missing.length} edit(s) are for pictures the last run did not have: ${missing.slice(0, 5).join(", ")}.`);
    this.status.textContent = [this.report, ...notes].filter(Boolean).join("\n") || "Edit a caption, or use the tools above.";
    this.status.style.color = this.reportProblem || this.valueError ? "#e88" : "#aaa";
  }
}

function editorOf(node) {
  const existing = node.widgets?.find((w) => w.name === EDITOR_WIDGET);
  if (existing) return existing.loralab_review;
  const valueWidget = node.widgets?.find((w) => w.name === VALUE_WIDGET);
  if (!valueWidget) return null;        // `reviewed` converted to an input: the edits come from elsewhere
  hideWidget(valueWidget);
  return new CaptionReview(node, valueWidget);
}

app.registerExtension({
  name: "LoRALab.captionReview",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== NODE) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      if (editorOf(this) && this.size) {
        this.setSize?.([Math.max(this.size[0], NODE_WIDTH), this.size[1]]);
        fitNodeToWidgets(this);
      }
      return result;
    };
    const onConfigure = nodeType.prototype.onConfigure;
    nodeType.prototype.onConfigure = function () {
      const result = onConfigure?.apply(this, arguments);
      const editor = editorOf(this);
      editor?.load();
      // The pictures of the run before a page reload, while the server still has them.
      const session = this.properties?.[SESSION_PROPERTY];
      if (editor && session && session !== editor.session) editor.open(session);
      return result;
    };
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (message) {
      const result = onExecuted?.apply(this, arguments);
      const run = message?.review?.[0];
      const text = Array.isArray(message?.text) ? message.text.join("\n") : "";
      if (run?.session) editorOf(this)?.open(run.session, text);
      return result;
    };
  },
});
