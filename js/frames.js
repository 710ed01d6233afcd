// Decoding the sampler's live preview (nodes/preview.py): a `zoetrope.preview` message carries the progress of a
// sampler and, every few steps, all frames of its current estimate as one JPEG grid, row by row.
//
// Pure functions, no DOM and no ComfyUI, so node's test runner checks them; js/zoetrope.js draws what they say.

import { formatSeconds } from "./plan.js";

// A message as the page keeps it. Unknown or broken fields make `frames` null rather than a wrong picture.
export function decodePreview(message) {
  const m = message ?? {};
  const live = {
    node: m.node == null ? null : String(m.node),
    done: m.done === true,
    step: Number(m.step) || 0,
    total: Number(m.total) || 0,
    secondsPerStep: Number(m.seconds_per_step),
    eta: Number(m.eta),
    frames: null,
  };
  const count = Number(m.count), columns = Number(m.columns);
  const width = Number(m.frame_width), height = Number(m.frame_height);
  if (typeof m.image === "string" && m.image && [count, columns, width, height].every((v) => Number.isInteger(v) && v > 0)) {
    live.frames = { src: `data:image/jpeg;base64,${m.image}`, count, columns, width, height,
                    fps: Number(m.fps) > 0 ? Number(m.fps) : 4, step: live.step };
  }
  return live;
}

// Where frame `index` sits in the grid (source rectangle for drawImage).
export function frameRect(frames, index) {
  const i = ((index % frames.count) + frames.count) % frames.count;
  return { sx: (i % frames.columns) * frames.width, sy: Math.floor(i / frames.columns) * frames.height,
           sw: frames.width, sh: frames.height };
}

// Which frame a looping animation shows `elapsedMs` after it started.
export function frameAt(frames, elapsedMs) {
  return Math.floor((Math.max(0, elapsedMs) / 1000) * frames.fps) % frames.count;
}

// The largest rectangle of the frame's aspect that fits the box, centred in it.
export function fitRect(frameWidth, frameHeight, box) {
  const scale = Math.min(box.w / frameWidth, box.h / frameHeight);
  const w = frameWidth * scale, h = frameHeight * scale;
  return { x: box.x + (box.w - w) / 2, y: box.y + (box.h - h) / 2, w, h };
}

// "step 7/20 · 0.42 s/step · 5.5 s left"
export function statusLine(live) {
  const parts = [`step ${live.step}/${live.total}`];
  if (Number.isFinite(live.secondsPerStep) && live.secondsPerStep > 0) {
    const s = live.secondsPerStep;
    parts.push(s >= 0.1 ? `${s >= 10 ? s.toFixed(0) : s >= 1 ? s.toFixed(1) : s.toFixed(2)} s/step`
                        : `${(s * 1000).toFixed(1)} ms/step`);
  }
  if (Number.isFinite(live.eta)) parts.push(`${formatSeconds(live.eta)} left`);
  return parts.join(" · ");
}
