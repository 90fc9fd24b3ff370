// The cards of this pack's workflows in the new front end's Templates browser.
//
// Front end 1.27 lists a pack's workflows from GET /workflow_templates: file names only, in the order the
// server's glob finds them (not sorted), each card titled with the raw file name and "described" with the
// same name, underscores turned to spaces. It reads no index.json (one in workflows/ would even show as a
// template called "index"). So the file names stay as they are (tests and docs use them), the list is put
// in order here, and each of our cards gets its human title and a one-line description.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

// In the order a new user meets them.
export const CARDS = {
  "1_caption_dataset": {
    title: "1 · Caption a dataset",
    description: "A folder of pictures → BLIP captions, trigger word first, saved as .txt files, and a contact sheet.",
  },
  "2_caption_train_sample": {
    title: "2 · Caption, train and sample",
    description: "Checkpoint + folder → captions → Train LoRA (live loss chart, previews) → a picture with the new LoRA.",
  },
  "3_pedals_and_grid": {
    title: "3 · Stack LoRAs and compare",
    description: "The trained LoRA and two more as pedals → Apply LoRA Stack → sample, and a grid of each LoRA alone and stacked.",
  },
  "4_resume_training": {
    title: "4 · Resume a training",
    description: "Continue a saved LoRA (weights, optimizer, schedule, step count) for more steps under a new name.",
  },
  "5_tag_review_train": {
    title: "5 · Tag, review and train a character",
    description: "Folder → BLIP sentence + WD14 tags → read and fix every caption on the node → Train LoRA → sample.",
  },
};
const ORDER = Object.keys(CARDS);

// This pack's folder name: the server lists templates and serves this file under it.
const PACK = decodeURIComponent(new URL(import.meta.url).pathname.split("/").slice(-2, -1)[0] ?? "");

export function inCardOrder(names) {
  const rank = (name) => (ORDER.includes(name) ? ORDER.indexOf(name) : ORDER.length);
  return [...names].sort((a, b) => rank(a) - rank(b) || String(a).localeCompare(String(b)));
}

function orderTheList() {
  const list = api.getWorkflowTemplates;
  if (typeof list !== "function" || list.loralab_wrapped) return;       // the 2024 front end has no such list
  const wrapped = async function () {
    const byPack = await list.apply(this, arguments);
    if (Array.isArray(byPack?.[PACK])) byPack[PACK] = inCardOrder(byPack[PACK]);
    return byPack;
  };
  wrapped.loralab_wrapped = true;
  api.getWorkflowTemplates = wrapped;
}

function retitleCards() {
  for (const [name, card] of Object.entries(CARDS)) {
    for (const element of document.querySelectorAll(`[data-testid="template-workflow-${CSS.escape(name)}"]`)) {
      const thumbnail = element.querySelector("img")?.getAttribute("src");
      if (thumbnail && !thumbnail.includes(`/workflow_templates/${PACK}/`) &&
          !thumbnail.includes(`/workflow_templates/${encodeURIComponent(PACK)}/`)) continue;   // another pack's
      const title = element.querySelector("h3");
      const description = element.querySelector("h3 + p, p");
      if (title && title.textContent.trim() !== card.title) Object.assign(title, { textContent: card.title, title: card.title });
      if (description && description.textContent.trim() !== card.description) {
        Object.assign(description, { textContent: card.description, title: card.description });
      }
    }
  }
}

let scheduled = false;
function scheduleRetitle() {
  if (scheduled) return;
  scheduled = true;
  requestAnimationFrame(() => {
    scheduled = false;
    retitleCards();
  });
}

orderTheList();            // before the Templates browser first asks (it keeps the first answer)
app.registerExtension({
  name: "LoRALab.templateCards",
  async setup() {
    new MutationObserver(scheduleRetitle).observe(document.body, { childList: true, subtree: true });
  },
});
