// Train LoRA never waits silently on a node that failed before it. ComfyUI runs what it can of a prompt:
// with the checkpoint missing, Caption still runs while Load Checkpoint only gets a thin red outline and
// Train LoRA is simply never executed. So every Train LoRA that depends on a failed node says what failed
// and the fix: from the queue's answer (validation errors, node_errors) and from execution_error events.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { resolveNode } from "./loss_chart.js";
import { describeExecutionError, describeNodeErrors, failuresReaching } from "./failure_text.js";
import { clearProblem, showProblem, trainNodes } from "./train_node.js";

function titleOf(id) {
  return resolveNode(app.graph, id)?.title ?? null;
}

function inputsOf(id) {
  const node = resolveNode(app.graph, id);
  return (node?.inputs ?? []).map((_, slot) => node.getInputNode?.(slot)?.id).filter((source) => source != null);
}

function tellTrainNodes(sentencesById, promptId) {
  // sentencesById: {failed node id: [sentence, ...]}
  for (const train of trainNodes()) {
    const failed = failuresReaching(train.id, Object.keys(sentencesById), inputsOf);
    if (!failed.length) continue;
    const lines = failed.flatMap((id) => sentencesById[id]);
    const waiting = failed.some((id) => String(id) !== String(train.id)) ? "Not trained: a node before this one failed.\n" : "";
    showProblem(train, waiting + lines.join("\n"), promptId);
  }
}

function reportNodeErrors(nodeErrors, promptId) {
  if (nodeErrors && Object.keys(nodeErrors).length) tellTrainNodes(describeNodeErrors(nodeErrors, titleOf), promptId);
}

function watchTheQueue() {
  // Both front ends queue through api.queuePrompt: a 200 answer may still carry node_errors (the outputs that
  // could not run), a 400 carries them in error.response. Wrapped, never replaced: every argument passes on.
  const queuePrompt = api.queuePrompt;
  if (typeof queuePrompt !== "function" || queuePrompt.loralab_wrapped) return;
  const wrapped = async function () {
    try {
      const answer = await queuePrompt.apply(this, arguments);
      reportNodeErrors(answer?.node_errors, answer?.prompt_id ?? null);
      return answer;
    } catch (error) {
      reportNodeErrors(error?.response?.node_errors, null);
      throw error;
    }
  };
  wrapped.loralab_wrapped = true;
  api.queuePrompt = wrapped;
}

app.registerExtension({
  name: "LoRALab.upstreamErrors",
  async setup() {
    watchTheQueue();
    api.addEventListener("execution_start", ({ detail }) => {
      for (const train of trainNodes()) clearProblem(train, detail?.prompt_id ?? null);
    });
    api.addEventListener("execution_error", ({ detail }) => {
      if (detail?.node_id == null) return;
      tellTrainNodes({ [detail.node_id]: [describeExecutionError(detail, titleOf)] }, detail.prompt_id ?? null);
    });
  },
});
