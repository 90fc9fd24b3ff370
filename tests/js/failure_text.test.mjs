// What Train LoRA says when a node it waits on failed (js/failure_text.js), run with `node --test`.
import test from "node:test";
import assert from "node:assert/strict";
import { describeExecutionError, describeNodeErrors, describeValidationError, failuresReaching } from "../../js/failure_text.js";

const missingCheckpoint = {
  type: "value_not_in_list", message: "Value not in list",
  details: "ckpt_name: 'v1-5-pruned-emaonly.safetensors' not in ['other.safetensors']",
  extra_info: { input_name: "ckpt_name", received_value: "v1-5-pruned-emaonly.safetensors" },
};

test("a missing model file names the node, input, file, folder and the fix", () => {
  assert.equal(describeValidationError("Load Checkpoint", missingCheckpoint),
    "Load Checkpoint: ckpt_name 'v1-5-pruned-emaonly.safetensors' is not in models/checkpoints — put the file there or pick another");
});

test("a value not in a list that is not a model file asks for another choice", () => {
  const error = { type: "value_not_in_list", extra_info: { input_name: "sampler_name", received_value: "old" } };
  assert.equal(describeValidationError("KSampler", error), "KSampler: sampler_name 'old' is not one of its choices — pick another");
});

test("an unconnected input and any other error keep ComfyUI's words", () => {
  assert.equal(describeValidationError("VAE Decode", { type: "required_input_missing", details: "vae" }),
    "VAE Decode: input vae is not connected — connect it");
  assert.equal(describeValidationError("Saves & Resume", { type: "custom_validation_failed", message: "Custom validation failed for node",
    details: "resume_from: not in any loras folder. Fix: pick a save" }),
    "Saves & Resume: Custom validation failed for node: resume_from: not in any loras folder. Fix: pick a save");
});

test("node_errors become sentences per node, titled by the graph, else by class", () => {
  const sentences = describeNodeErrors({ 4: { errors: [missingCheckpoint], class_type: "CheckpointLoaderSimple" },
                                         9: { errors: [], class_type: "VAEDecode" } },
                                       (id) => (id === "4" ? "My checkpoint" : null));
  assert.match(sentences[4][0], /^My checkpoint: ckpt_name/);
  assert.deepEqual(sentences[9], ["VAEDecode: invalid"]);
});

test("an execution error says which node failed and its message", () => {
  const detail = { node_id: "5", node_type: "LoraLabCaption", exception_message: "BLIP files missing\n", exception_type: "RuntimeError" };
  assert.equal(describeExecutionError(detail, () => "Caption Dataset"), "Caption Dataset failed: BLIP files missing");
  assert.equal(describeExecutionError(detail, () => null), "LoraLabCaption failed: BLIP files missing");
});

test("only failures upstream of (or at) the Train node reach it", () => {
  // 1 -> 2 -> 7 (train) <- 3 ; 4 -> 5 (elsewhere)
  const inputs = { 7: [2, 3], 2: [1], 3: [], 1: [], 5: [4], 4: [] };
  const inputsOf = (id) => inputs[id] ?? [];
  assert.deepEqual(failuresReaching(7, ["1", "4"], inputsOf), ["1"]);
  assert.deepEqual(failuresReaching(7, ["7"], inputsOf), ["7"]);
  assert.deepEqual(failuresReaching(7, ["5"], inputsOf), []);
});

test("a loop in the graph cannot hang the walk", () => {
  const inputsOf = (id) => ({ 1: [2], 2: [1] })[id] ?? [];
  assert.deepEqual(failuresReaching(1, ["2"], inputsOf), ["2"]);
});
