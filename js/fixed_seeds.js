// Both front ends give an INT named "seed" a control widget that defaults to "randomize": a re-queued,
// unchanged graph would then retrain (re-render the grid, sample new class pictures) every time. These nodes
// start "fixed".
import { app } from "../../scripts/app.js";

const FIXED_SEED_NODES = new Set(["LoraLabTrainLora", "LoraLabLoraCompareGrid", "LoraLabClassImages"]);

function startSeedFixed(nodeType) {
  // onNodeCreated runs before a saved workflow's values are applied, so saved choices still win.
  const onNodeCreated = nodeType.prototype.onNodeCreated;
  nodeType.prototype.onNodeCreated = function () {
    const result = onNodeCreated?.apply(this, arguments);
    const control = this.widgets?.find((w) => w.name === "control_after_generate");
    if (control) control.value = "fixed";
    return result;
  };
}

app.registerExtension({
  name: "LoRALab.fixedSeeds",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (FIXED_SEED_NODES.has(nodeData.name)) startSeedFixed(nodeType);
  },
});
