// The caption review's logic as data: tag edits with the same rules as trainer/captions/edits.py (tags are
// split on commas, except a comma between two digits, "1,000"; whole tags compare ignoring case), and the
// review state the node keeps in its `reviewed` widget (trainer/captions/review.py reads the same JSON).
// No DOM and no ComfyUI imports: tests/js/caption_edits.test.mjs covers it, and
// tests/unit/captions/test_caption_edits_parity.py runs these and the Python functions on the same cases.

const SEPARATOR = /(?<!\d),|,(?!\d)/;
export const REVIEW_VERSION = 1;
export const FILTERS = ["all", "with", "without", "edited"];

export function splitTags(text) {
  return String(text ?? "").split(SEPARATOR).map((part) => part.trim().split(/\s+/).join(" ")).filter(Boolean);
}

export function joinTags(tags) {
  return tags.join(", ");
}

export function normalize(text) {
  return joinTags(splitTags(text));
}

function lowered(text) {
  return new Set(splitTags(text).map((tag) => tag.toLowerCase()));
}

export function removeTags(caption, unwanted) {
  const drop = lowered(unwanted);
  return joinTags(splitTags(caption).filter((tag) => !drop.has(tag.toLowerCase())));
}

export function addTags(caption, wanted) {
  // At the end, each once: a tag the caption has (in any case) stays where it is.
  const tags = splitTags(caption);
  const have = new Set(tags.map((tag) => tag.toLowerCase()));
  for (const tag of splitTags(wanted)) {
    if (!have.has(tag.toLowerCase())) {
      tags.push(tag);
      have.add(tag.toLowerCase());
    }
  }
  return joinTags(tags);
}

export function findReplace(caption, find, replace) {
  // Plain text, every occurrence, case-sensitive (as the Caption node's find/replace), then tidied.
  return normalize(find ? String(caption).split(find).join(replace ?? "") : caption);
}

export function putTriggerFirst(caption, trigger) {
  const seen = new Set();
  const first = splitTags(trigger).filter((tag) => !seen.has(tag.toLowerCase()) && seen.add(tag.toLowerCase()));
  if (!first.length) return normalize(caption);
  return joinTags([...first, ...splitTags(caption).filter((tag) => !seen.has(tag.toLowerCase()))]);
}

export function hasEveryTag(caption, tags) {
  const have = lowered(caption);
  return [...lowered(tags)].every((tag) => have.has(tag));
}

export function hasAnyTag(caption, tags) {
  const have = lowered(caption);
  return [...lowered(tags)].some((tag) => have.has(tag));
}

// --- the review state ------------------------------------------------------------------------------
// pictures: [{key, caption}] as the last run received them; reviewed: {key: caption} for the edited ones.

export function parseReviewed(text) {
  if (text === undefined || text === null || !String(text).trim()) return { captions: {}, error: null };
  try {
    let value = JSON.parse(text);
    if (value && typeof value === "object" && "captions" in value) {
      if ((value.version ?? REVIEW_VERSION) !== REVIEW_VERSION) {
        return { captions: {}, error: `saved by a newer LoRA Lab (format ${value.version})` };
      }
      value = value.captions;
    }
    if (!value || typeof value !== "object" || Array.isArray(value)) return { captions: {}, error: "not an object" };
    const captions = {};
    for (const [key, caption] of Object.entries(value)) {
      if (typeof caption !== "string") return { captions: {}, error: `the caption of ${key} is not text` };
      captions[key] = caption;
    }
    return { captions, error: null };
  } catch (error) {
    return { captions: {}, error: `not valid JSON (${error.message})` };
  }
}

export function serializeReviewed(captions) {
  const keys = Object.keys(captions).sort();
  if (!keys.length) return "";
  return JSON.stringify({ version: REVIEW_VERSION, captions: Object.fromEntries(keys.map((key) => [key, captions[key]])) });
}

export function shownCaption(picture, reviewed) {
  return Object.hasOwn(reviewed, picture.key) ? reviewed[picture.key] : picture.caption;
}

export function isEdited(picture, reviewed) {
  return Object.hasOwn(reviewed, picture.key) && reviewed[picture.key] !== picture.caption;
}

export function withCaption(reviewed, picture, caption) {
  // A caption typed back to what arrived is no edit: the entry goes, so upstream changes reach it again.
  const next = { ...reviewed };
  if (caption === picture.caption) delete next[picture.key];
  else next[picture.key] = caption;
  return next;
}

export function matchesFilter(picture, reviewed, mode, tags) {
  const caption = shownCaption(picture, reviewed);
  if (mode === "edited") return isEdited(picture, reviewed);
  if (!splitTags(tags).length || mode === "all") return true;
  if (mode === "with") return hasEveryTag(caption, tags);
  if (mode === "without") return !hasAnyTag(caption, tags);
  return true;
}

export function shownPictures(pictures, reviewed, mode, tags) {
  return pictures.filter((picture) => matchesFilter(picture, reviewed, mode, tags));
}

export function editAll(pictures, reviewed, edit) {
  // edit(caption) -> caption, for each of `pictures` (the shown ones). Returns the new state, how many changed,
  // and `undo`: each changed key's entry before (a caption, or undefined for "no edit"), so Undo takes back
  // this action alone. A caption the tool only tidied ("a,b" -> "a, b": it matched nothing) is left alone,
  // so it keeps following upstream.
  let next = reviewed;
  const undo = {};
  for (const picture of pictures) {
    const before = shownCaption(picture, next);
    const after = edit(before);
    if (after !== before && after !== normalize(before)) {
      undo[picture.key] = Object.hasOwn(next, picture.key) ? next[picture.key] : undefined;
      next = withCaption(next, picture, after);
    }
  }
  return { reviewed: next, changed: Object.keys(undo).length, undo };
}

export function undoEdit(reviewed, undo) {
  // Put back the entries an editAll (or a revert, or forgetting) changed; other edits made since stay.
  const next = { ...reviewed };
  for (const [key, caption] of Object.entries(undo)) {
    if (caption === undefined) delete next[key];
    else next[key] = caption;
  }
  return next;
}

export function missingKeys(reviewed, pictures) {
  // The edited pictures the last run did not have (renamed, removed): kept, but listed.
  const keys = new Set(pictures.map((picture) => picture.key));
  return Object.keys(reviewed).filter((key) => !keys.has(key));
}
