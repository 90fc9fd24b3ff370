// The pedalboard's rows as data: parse the `pedals` widget's JSON, edit rows, write JSON back.
// No DOM and no ComfyUI imports, so node's test runner covers it (tests/js/pedal_rows.test.mjs).
// The server parses the same JSON (nodes/pedalboard.py): a list of {on, lora, strength_model, strength_clip}
// plus an optional "blocks" (block weights: a preset name or numbers, checked by the server).

export const STRENGTH_LIMIT = 10;
export const STRENGTH_STEP = 0.05;
export const DEFAULT_STRENGTH = 1;

export function clampStrength(value, fallback = DEFAULT_STRENGTH) {
  // Typed text, spinner steps and old values all land inside -10..10, without float noise (0.1+0.2).
  const number = typeof value === "string" && value.trim() === "" ? NaN : Number(value);
  if (!Number.isFinite(number)) return fallback;
  const clamped = Math.min(STRENGTH_LIMIT, Math.max(-STRENGTH_LIMIT, number));
  return Math.round(clamped * 1000) / 1000;
}

export function newRow(lora = "") {
  return { on: true, lora: String(lora ?? ""), strength_model: DEFAULT_STRENGTH, strength_clip: DEFAULT_STRENGTH };
}

export function normalizeRow(row) {
  // Only the keys the server reads; missing ones take the server's defaults. "blocks" is written only
  // when set, so boards without block weights keep the JSON they always had.
  const source = row && typeof row === "object" ? row : {};
  const normal = {
    on: source.on === undefined ? true : source.on === true,
    lora: typeof source.lora === "string" ? source.lora : "",
    strength_model: clampStrength(source.strength_model),
    strength_clip: clampStrength(source.strength_clip),
  };
  const blocks = typeof source.blocks === "string" ? source.blocks.trim() : "";
  if (blocks) normal.blocks = blocks;
  return normal;
}

export function parseRows(text) {
  // {rows, error}: a value the editor cannot read is reported, and left alone until the user edits.
  if (text === undefined || text === null || (typeof text === "string" && text.trim() === "")) {
    return { rows: [], error: null };
  }
  let data;
  try {
    data = typeof text === "string" ? JSON.parse(text) : text;
  } catch (error) {
    return { rows: [], error: `pedals is not valid JSON (${error.message})` };
  }
  if (!Array.isArray(data)) return { rows: [], error: "pedals is not a list of rows" };
  return { rows: data.map(normalizeRow), error: null };
}

export function serializeRows(rows) {
  return JSON.stringify(rows.map(normalizeRow));
}

export function addRow(rows, lora = "") {
  return [...rows, newRow(lora)];
}

export function removeRow(rows, index) {
  if (index < 0 || index >= rows.length) return rows;
  return rows.filter((_, i) => i !== index);
}

export function moveRow(rows, index, delta) {
  // Out-of-range moves (the top row up, the bottom row down) change nothing.
  const target = index + delta;
  if (index < 0 || index >= rows.length || target < 0 || target >= rows.length) return rows;
  const next = rows.slice();
  const [row] = next.splice(index, 1);
  next.splice(target, 0, row);
  return next;
}

export function setRowField(rows, index, field, value) {
  if (index < 0 || index >= rows.length) return rows;
  const row = { ...rows[index] };
  if (field === "on") row.on = value === true;
  else if (field === "lora") row.lora = String(value ?? "");
  else if (field === "strength_model" || field === "strength_clip") row[field] = clampStrength(value, row[field]);
  else if (field === "blocks") {
    const blocks = String(value ?? "").trim();
    if (blocks) row.blocks = blocks;
    else delete row.blocks;
  } else throw new Error(`unknown pedal field: ${field}`);
  return rows.map((r, i) => (i === index ? row : r));
}

export function rowIsActive(row) {
  // The server's rule: off, empty or both-zero rows are skipped.
  return row.on && row.lora !== "" && row.lora !== "None" && (row.strength_model !== 0 || row.strength_clip !== 0);
}

export function nameKey(name) {
  // Names saved on Windows ("a\\b") match the server's list ("a/b").
  return String(name ?? "").trim().replace(/\\/g, "/").replace(/\/+/g, "/");
}

export function loraOptions(names, current) {
  // The <select>'s options: an empty choice, every listed LoRA, and a row's name that is not listed
  // (a workflow from another machine) kept and marked, so loading never silently switches LoRAs.
  const options = [{ value: "", label: "— pick a LoRA —", missing: false }];
  let found = current === "" || current === undefined || current === null;
  for (const name of names) {
    const matches = !found && nameKey(name) === nameKey(current);
    options.push({ value: matches ? current : name, label: name, missing: false });
    found = found || matches;
  }
  if (!found) options.push({ value: current, label: `${current} (missing)`, missing: true });
  return options;
}

export function triggerText(info) {
  if (!info) return "";
  if (info.error) return info.error;
  const words = Array.isArray(info.trigger_words) ? info.trigger_words.filter(Boolean) : [];
  const base = info.base_model ? ` · ${info.base_model}` : "";
  const rank = Number.isFinite(info.network_dim) ? ` · rank ${info.network_dim}` : "";
  return (words.length ? `trigger: ${words.join(", ")}` : "no trigger words") + base + rank;
}

export function trainedTagsText(info, limit = 20) {
  // The tags the LoRA was trained with and how many captions had each (kohya's ss_tag_frequency).
  const tags = Array.isArray(info?.trained_tags) ? info.trained_tags.slice(0, limit) : [];
  if (!tags.length) return "";
  const more = info.trained_tags.length > limit ? ", …" : "";
  return `trained tags: ${tags.map(([tag, count]) => `${tag} (${count})`).join(", ")}${more}`;
}

export const OFF_SUFFIX = " (off)";

export function pedalTitle(title, on) {
  // A LoRA Pedal's title says "(off)" exactly while it is switched off; the rest is the user's.
  const base = String(title ?? "").replace(/\s*\(off\)\s*$/, "");
  return on ? base : base + OFF_SUFFIX;
}
