// Small numbers in the new front end's Vue node renderer: its number box shows at most three decimals
// unless told otherwise, so a learning rate of 1e-4 reads "0". Each LoRA Lab FLOAT widget gets as many
// decimals as its step, minimum and default need (the canvas renderers format by `precision` and ignore this).
import { app } from "../../scripts/app.js";

const MOST_DIGITS = 10;

export function decimalsFor(...numbers) {
  // The decimals that show every given number's first significant digit (0.05 -> 2, 1e-7 -> 7).
  let digits = 2;
  for (const n of numbers) {
    const size = Math.abs(Number(n));
    if (Number.isFinite(size) && size > 0 && size < 1) digits = Math.max(digits, Math.ceil(-Math.log10(size) - 1e-9));
  }
  return Math.min(MOST_DIGITS, digits);
}

function floatInputs(nodeData) {
  const inputs = { ...(nodeData.input?.required ?? {}), ...(nodeData.input?.optional ?? {}) };
  return Object.entries(inputs).filter(([, spec]) => spec?.[0] === "FLOAT").map(([name, spec]) => [name, spec[1] ?? {}]);
}

app.registerExtension({
  name: "LoRALab.floatDigits",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name?.startsWith("LoraLab")) return;
    const floats = floatInputs(nodeData);
    if (!floats.length) return;
    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const result = onNodeCreated?.apply(this, arguments);
      for (const [name, spec] of floats) {
        const widget = this.widgets?.find((w) => w.name === name);
        if (!widget?.options) continue;
        // PrimeVue's InputNumber (what the Vue renderer shows) reads these from the widget's options.
        widget.options.maxFractionDigits = decimalsFor(spec.step, spec.min, spec.default, spec.round);
      }
      return result;
    };
  },
});
