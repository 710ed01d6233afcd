// node --test: decoding the live preview's messages and frame grid (js/frames.js), the inverse of
// nodes/preview.py frame_grid (row by row, `columns` across).
import assert from "node:assert/strict";
import { test } from "node:test";

import { decodePreview, fitRect, frameAt, frameRect, statusLine } from "../../../js/frames.js";

const message = { node: "12:4", step: 6, total: 20, seconds_per_step: 0.5, eta: 7, image: "AAAA", count: 5,
                  columns: 3, frame_width: 16, frame_height: 9, fps: 2 };

test("a message with frames decodes to a data URL and the grid's geometry", () => {
  const live = decodePreview(message);
  assert.equal(live.node, "12:4");
  assert.equal(live.frames.src, "data:image/jpeg;base64,AAAA");
  assert.deepEqual([live.frames.count, live.frames.columns, live.frames.width, live.frames.height, live.frames.fps],
                   [5, 3, 16, 9, 2]);
  assert.equal(live.done, false);
});

test("progress without frames, a done message and broken frames", () => {
  assert.equal(decodePreview({ node: 3, step: 1, total: 2 }).frames, null);
  assert.equal(decodePreview({ node: 3, step: 1, total: 2 }).node, "3");
  assert.equal(decodePreview({ node: "3", done: true }).done, true);
  assert.equal(decodePreview({ ...message, columns: 0 }).frames, null);
  assert.equal(decodePreview({ ...message, image: 7 }).frames, null);
  assert.equal(decodePreview(null).node, null);
});

test("frame i sits at column i % columns, row i / columns", () => {
  const f = decodePreview(message).frames;
  const seen = new Set();
  for (let i = 0; i < f.count; i++) {
    const r = frameRect(f, i);
    assert.equal(r.sx, (i % 3) * 16);
    assert.equal(r.sy, Math.floor(i / 3) * 9);
    assert.deepEqual([r.sw, r.sh], [16, 9]);
    seen.add(`${r.sx},${r.sy}`);
  }
  assert.equal(seen.size, f.count);
  assert.deepEqual(frameRect(f, 5), frameRect(f, 0));      // wraps
});

test("the animation loops through every frame at the message's rate", () => {
  const f = decodePreview(message).frames;                  // 5 frames at 2 fps: 2.5 s a loop
  const shown = [];
  for (let ms = 0; ms < 5000; ms += 500) shown.push(frameAt(f, ms));
  assert.deepEqual(shown, [0, 1, 2, 3, 4, 0, 1, 2, 3, 4]);
  assert.equal(frameAt(f, -10), 0);
});

test("frames are fitted into the box keeping their aspect, centred", () => {
  const r = fitRect(16, 9, { x: 10, y: 20, w: 160, h: 160 });
  assert.deepEqual(r, { x: 10, y: 20 + (160 - 90) / 2, w: 160, h: 90 });
  const tall = fitRect(9, 16, { x: 0, y: 0, w: 160, h: 160 });
  assert.equal(tall.h, 160);
  assert.equal(tall.x, (160 - 90) / 2);
});

test("the status line says the step, seconds per step and the time left", () => {
  assert.equal(statusLine(decodePreview(message)), "step 6/20 · 0.50 s/step · 7.0 s left");
  assert.equal(statusLine(decodePreview({ node: 1, step: 3, total: 50, seconds_per_step: 12.3, eta: 580 })),
               "step 3/50 · 12 s/step · 9 min 40 s left");
  assert.equal(statusLine(decodePreview({ node: 1, step: 1, total: 4 })), "step 1/4");
  assert.equal(statusLine(decodePreview({ node: 1, step: 9, total: 900, seconds_per_step: 0.0024, eta: 2.1 })),
               "step 9/900 · 2.4 ms/step · 2.1 s left");
});
