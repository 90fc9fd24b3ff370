// What to tell a Train LoRA node when a node it waits on failed: pure text from ComfyUI's answers (a queue
// response's node_errors, an execution_error event), no ComfyUI or DOM, so node's test runner covers it
// (tests/js/failure_text.test.mjs).

// The models folder each loader's file list comes from, so "not in the list" can say where to put the file.
const MODEL_FOLDERS = {
  ckpt_name: "checkpoints", lora_name: "loras", vae_name: "vae", control_net_name: "controlnet",
  unet_name: "diffusion_models", clip_name: "text_encoders", style_model_name: "style_models",
  model_name: "upscale_models", embedding: "embeddings",
};

function quoted(value) {
  return typeof value === "string" ? `'${value}'` : JSON.stringify(value);
}

export function describeValidationError(title, error) {
  // One of ComfyUI's validation errors ({type, message, details, extra_info}) as a sentence with its fix.
  const input = error?.extra_info?.input_name;
  const value = error?.extra_info?.received_value;
  if (error?.type === "value_not_in_list" && input) {
    const folder = MODEL_FOLDERS[input];
    return folder
      ? `${title}: ${input} ${quoted(value)} is not in models/${folder} — put the file there or pick another`
      : `${title}: ${input} ${quoted(value)} is not one of its choices — pick another`;
  }
  if (error?.type === "required_input_missing") {
    return `${title}: input ${error.details || input} is not connected — connect it`;
  }
  const details = error?.details ? `: ${error.details}` : "";
  return `${title}: ${error?.message ?? "invalid"}${details}`;
}

export function describeNodeErrors(nodeErrors, titleOf) {
  // node_errors: {id: {errors: [...], class_type}} -> {id: ["sentence", ...]}
  const sentences = {};
  for (const [id, entry] of Object.entries(nodeErrors ?? {})) {
    const title = titleOf(id) ?? entry?.class_type ?? `node ${id}`;
    const errors = entry?.errors?.length ? entry.errors : [{ message: "invalid" }];
    sentences[id] = errors.map((error) => describeValidationError(title, error));
  }
  return sentences;
}

export function describeExecutionError(detail, titleOf) {
  const title = titleOf(detail?.node_id) ?? detail?.node_type ?? `node ${detail?.node_id}`;
  const message = String(detail?.exception_message ?? detail?.exception_type ?? "it raised an error").trim();
  return `${title} failed: ${message}`;
}

export function failuresReaching(trainId, failedIds, inputsOf) {
  // The failed nodes among trainId and everything upstream of it (inputsOf(id) -> ids feeding id).
  const failed = new Set(failedIds.map(String));
  const seen = new Set();
  const found = [];
  const stack = [String(trainId)];
  while (stack.length) {
    const id = stack.pop();
    if (seen.has(id)) continue;
    seen.add(id);
    if (failed.has(id)) found.push(id);
    stack.push(...inputsOf(id).map(String));
  }
  return found;
}
