// Unit tests of the pedalboard's row logic (js/pedal_rows.js), run with `node --test` (tests/unit/test_js.py).
import test from "node:test";
import assert from "node:assert/strict";
import {
  addRow, clampStrength, loraOptions, moveRow, newRow, parseRows, pedalTitle, removeRow, rowIsActive, serializeRows,
  setRowField, trainedTagsText, triggerText,
} from "../../js/pedal_rows.js";

const A = { on: true, lora: "a.safetensors", strength_model: 1, strength_clip: 0.5 };
const B = { on: false, lora: "sub/b.safetensors", strength_model: -2, strength_clip: 0 };
const C = { on: true, lora: "c.safetensors", strength_model: 0.25, strength_clip: 0.25 };

test("rows survive a JSON round trip exactly as the server reads them", () => {
  const text = serializeRows([A, B, C]);
  assert.deepEqual(JSON.parse(text), [A, B, C]);
  assert.deepEqual(parseRows(text), { rows: [A, B, C], error: null });
});

test("empty values are an empty board; broken ones are reported, not replaced", () => {
  for (const empty of ["", "  ", "[]", undefined, null]) assert.deepEqual(parseRows(empty).rows, []);
  assert.equal(parseRows("[]").error, null);
  const broken = parseRows('[{"lora": ');
  assert.deepEqual(broken.rows, []);
  assert.match(broken.error, /not valid JSON/);
  assert.match(parseRows('{"lora": "a"}').error, /not a list/);
});

test("missing keys take the server's defaults and unknown keys are dropped", () => {
  const { rows } = parseRows('[{"lora": "a.safetensors", "colour": "red"}, {}]');
  assert.deepEqual(rows, [
    { on: true, lora: "a.safetensors", strength_model: 1, strength_clip: 1 },
    { on: true, lora: "", strength_model: 1, strength_clip: 1 },
  ]);
  assert.equal(parseRows('[{"on": "yes"}]').rows[0].on, false, "only true switches a row on");
});

test("strengths are clamped to -10..10 and keep their typed precision", () => {
  assert.equal(clampStrength(12), 10);
  assert.equal(clampStrength(-99), -10);
  assert.equal(clampStrength("0.35"), 0.35);
  assert.equal(clampStrength(0.1 + 0.2), 0.3);
  assert.equal(clampStrength("", 0.7), 0.7);
  assert.equal(clampStrength("abc", 0.7), 0.7);
  assert.equal(clampStrength(NaN), 1);
});

test("add appends a fresh row and never touches the given array", () => {
  const rows = [A];
  const added = addRow(rows, "x.safetensors");
  assert.deepEqual(added, [A, newRow("x.safetensors")]);
  assert.deepEqual(added[1], { on: true, lora: "x.safetensors", strength_model: 1, strength_clip: 1 });
  assert.deepEqual(rows, [A]);
  assert.deepEqual(addRow([]), [newRow("")]);
});

test("remove drops exactly one row; out of range changes nothing", () => {
  assert.deepEqual(removeRow([A, B, C], 1), [A, C]);
  assert.deepEqual(removeRow([A, B, C], 0), [B, C]);
  assert.deepEqual(removeRow([A, B, C], 3), [A, B, C]);
  assert.deepEqual(removeRow([A, B, C], -1), [A, B, C]);
});

test("move up and down swap neighbours; the ends stay put", () => {
  const rows = [A, B, C];
  assert.deepEqual(moveRow(rows, 1, -1), [B, A, C]);
  assert.deepEqual(moveRow(rows, 1, +1), [A, C, B]);
  assert.deepEqual(moveRow(rows, 0, -1), [A, B, C]);
  assert.deepEqual(moveRow(rows, 2, +1), [A, B, C]);
  assert.deepEqual(rows, [A, B, C], "the original order is untouched");
});

test("editing one field changes only that row", () => {
  const rows = [A, B];
  assert.deepEqual(setRowField(rows, 1, "on", true)[1], { ...B, on: true });
  assert.deepEqual(setRowField(rows, 0, "lora", "z.safetensors")[0], { ...A, lora: "z.safetensors" });
  assert.equal(setRowField(rows, 0, "strength_model", "15")[0].strength_model, 10);
  assert.equal(setRowField(rows, 0, "strength_clip", "")[0].strength_clip, 0.5, "blank keeps the old value");
  assert.equal(setRowField(rows, 1, "strength_clip", -0.05)[1].strength_clip, -0.05);
  assert.equal(setRowField(rows, 0, "strength_clip", 2)[1], B);
  assert.deepEqual(rows, [A, B]);
  assert.throws(() => setRowField(rows, 0, "colour", 1), /unknown pedal field/);
});

test("a row is active like on the server: on, a LoRA, a non-zero strength", () => {
  assert.equal(rowIsActive(A), true);
  assert.equal(rowIsActive(B), false);
  assert.equal(rowIsActive({ ...A, lora: "" }), false);
  assert.equal(rowIsActive({ ...A, lora: "None" }), false);
  assert.equal(rowIsActive({ ...A, strength_model: 0, strength_clip: 0 }), false);
  assert.equal(rowIsActive({ ...A, strength_model: 0 }), true);
});

test("the LoRA choices keep a saved name that is not listed, and match Windows spellings", () => {
  const names = ["a.safetensors", "sub/b.safetensors"];
  const plain = loraOptions(names, "a.safetensors");
  assert.deepEqual(plain.map((o) => o.value), ["", "a.safetensors", "sub/b.safetensors"]);
  const missing = loraOptions(names, "gone.safetensors");
  assert.deepEqual(missing.at(-1), { value: "gone.safetensors", label: "gone.safetensors (missing)", missing: true });
  const windows = loraOptions(names, "sub\\b.safetensors");
  assert.equal(windows.length, 3, "a Windows spelling is the listed file, not a missing one");
  assert.equal(windows[2].value, "sub\\b.safetensors", "the saved value is kept as written");
  assert.equal(loraOptions(names, "").length, 3);
});

test("trigger words read like a caption line", () => {
  assert.equal(triggerText({ trigger_words: ["stylex"], base_model: "sd_v1", network_dim: 4 }),
    "trigger: stylex · sd_v1 · rank 4");
  assert.equal(triggerText({ trigger_words: [] }), "no trigger words");
  assert.equal(triggerText({ error: "not found" }), "not found");
  assert.equal(triggerText(null), "");
});

test("trained tags read as tag (captions), most frequent first, cut after the limit", () => {
  const info = { trained_tags: [["hero", 12], ["red cape", 7], ["city", 2]] };
  assert.equal(trainedTagsText(info), "trained tags: hero (12), red cape (7), city (2)");
  assert.equal(trainedTagsText(info, 2), "trained tags: hero (12), red cape (7), …");
  assert.equal(trainedTagsText({ trained_tags: [] }), "");
  assert.equal(trainedTagsText(null), "");
});

test("a pedal's title says (off) exactly while it is off, keeping the user's words", () => {
  assert.equal(pedalTitle("Pedal 2: a style LoRA (off)", true), "Pedal 2: a style LoRA");
  assert.equal(pedalTitle("Pedal 2: a style LoRA", false), "Pedal 2: a style LoRA (off)");
  assert.equal(pedalTitle("Pedal 2: a style LoRA (off)", false), "Pedal 2: a style LoRA (off)");
  assert.equal(pedalTitle("LoRA Pedal", true), "LoRA Pedal");
});

test("block weights travel in a row's \"blocks\" only when set, trimmed", () => {
  const { rows } = parseRows('[{"lora": "a.safetensors", "blocks": " MIDD "}, {"lora": "b.safetensors", "blocks": ""}]');
  assert.equal(rows[0].blocks, "MIDD");
  assert.equal("blocks" in rows[1], false, "an empty value writes no key: old boards keep their JSON");
  const set = setRowField(rows, 1, "blocks", "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0");
  assert.equal(JSON.parse(serializeRows(set))[1].blocks, "1,0,0,0,1,1,1,1,1,1,1,1,0,0,0,0,0");
  const cleared = setRowField(set, 0, "blocks", "   ");
  assert.deepEqual(Object.keys(JSON.parse(serializeRows(cleared))[0]), ["on", "lora", "strength_model", "strength_clip"]);
  assert.equal(rows[0].blocks, "MIDD", "editing makes a new row; the old one is unchanged");
});
