// Unit tests of the caption review's logic (js/caption_edits.js), run with `node --test` (tests/unit/test_js.py).
// The tag rules themselves are checked against Python's in tests/unit/captions/test_review.py.
import test from "node:test";
import assert from "node:assert/strict";
import {
  addTags, editAll, findReplace, isEdited, matchesFilter, missingKeys, parseReviewed, removeTags, serializeReviewed,
  shownCaption, shownPictures, undoEdit, withCaption,
} from "../../js/caption_edits.js";

const PICTURES = [
  { key: "a.png", caption: "ohwx, red dress, smile" },
  { key: "b.png", caption: "ohwx, blue dress" },
  { key: "sub/c.png", caption: "" },
];

test("the reviewed value round-trips in the server's format, keys sorted, empty as no value", () => {
  const text = serializeReviewed({ "b.png": "two", "a.png": "one" });
  assert.equal(text, '{"version":1,"captions":{"a.png":"one","b.png":"two"}}');
  assert.deepEqual(parseReviewed(text), { captions: { "a.png": "one", "b.png": "two" }, error: null });
  assert.equal(serializeReviewed({}), "");
  for (const empty of ["", " ", undefined, null]) assert.deepEqual(parseReviewed(empty), { captions: {}, error: null });
});

test("an unreadable value is reported, not silently replaced", () => {
  assert.match(parseReviewed("{oops").error, /not valid JSON/);
  assert.match(parseReviewed('{"version":2,"captions":{}}').error, /newer LoRA Lab/);
  assert.match(parseReviewed('{"a.png":3}').error, /not text/);
  assert.match(parseReviewed("[1]").error, /not an object/);
});

test("typing a caption back to what arrived removes the edit, so upstream changes reach it again", () => {
  let reviewed = withCaption({}, PICTURES[0], "ohwx, red dress");
  assert.deepEqual(reviewed, { "a.png": "ohwx, red dress" });
  assert.ok(isEdited(PICTURES[0], reviewed) && !isEdited(PICTURES[1], reviewed));
  assert.equal(shownCaption(PICTURES[0], reviewed), "ohwx, red dress");
  reviewed = withCaption(reviewed, PICTURES[0], PICTURES[0].caption);
  assert.deepEqual(reviewed, {});
});

test("a bulk edit changes only the pictures given and counts them; the old state is untouched", () => {
  const before = { "b.png": "ohwx, blue dress, hat" };
  const { reviewed, changed } = editAll(PICTURES, before, (caption) => removeTags(caption, "OHWX"));
  assert.equal(changed, 2);                                   // c has no ohwx: unchanged, not counted
  assert.deepEqual(reviewed, { "a.png": "red dress, smile", "b.png": "blue dress, hat" });
  assert.deepEqual(before, { "b.png": "ohwx, blue dress, hat" });
});

test("a caption the tool only tidies is not edited: it keeps following upstream", () => {
  const untidy = [{ key: "u.png", caption: "ohwx,red dress" }, { key: "v.png", caption: "ohwx, red theme" }];
  const { reviewed, changed } = editAll(untidy, {}, (caption) => findReplace(caption, "red theme", "crimson"));
  assert.equal(changed, 1);
  assert.deepEqual(reviewed, { "v.png": "ohwx, crimson" });
});

test("undo takes back one bulk edit and keeps what was typed since on other pictures", () => {
  const start = { "b.png": "ohwx, blue dress, hat" };
  const bulk = editAll(PICTURES, start, (caption) => removeTags(caption, "ohwx"));
  assert.deepEqual(bulk.undo, { "a.png": undefined, "b.png": "ohwx, blue dress, hat" });
  const typed = withCaption(bulk.reviewed, PICTURES[2], "a typed caption");
  assert.deepEqual(undoEdit(typed, bulk.undo), { "b.png": "ohwx, blue dress, hat", "sub/c.png": "a typed caption" });
});

test("adding tags appends the missing ones once, in any case", () => {
  assert.equal(addTags("ohwx, Smile", "smile, hat, HAT, 1,000"), "ohwx, Smile, hat, 1,000");
  assert.equal(addTags("", "hat"), "hat");
});

test("filters: with every tag, without any, edited here; an empty tag list shows all", () => {
  const reviewed = { "b.png": "ohwx, blue dress, smile" };
  const keys = (mode, tags) => shownPictures(PICTURES, reviewed, mode, tags).map((p) => p.key);
  assert.deepEqual(keys("with", "SMILE"), ["a.png", "b.png"]);            // b's edited caption counts
  assert.deepEqual(keys("with", "smile, red dress"), ["a.png"]);
  assert.deepEqual(keys("without", "smile, hat"), ["sub/c.png"]);
  assert.deepEqual(keys("edited", ""), ["b.png"]);
  assert.deepEqual(keys("with", " , "), ["a.png", "b.png", "sub/c.png"]);
  assert.equal(matchesFilter(PICTURES[2], {}, "all", "smile"), true);
});

test("edits for pictures the run did not have are listed", () => {
  assert.deepEqual(missingKeys({ "a.png": "x", "old.png": "y" }, PICTURES), ["old.png"]);
});
