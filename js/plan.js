// The generation plan shown on ZoetropeVideoNoise before anything runs: what a request turns into (snapped frames
// and size, duration, latent shape, token count) and roughly how much memory sampling it takes.
//
// Pure functions, no DOM and no ComfyUI: node's test runner checks them, and a Python test checks that they
// agree with pipeline/generate.py plan() on every family. The numbers of the released models are data (the
// parameter counts of the real checkpoints; the tests compare them with the layouts of those files).

// A VAE family's geometry and its models' frame rate: frames follow 1 + temporal*k; width and height are multiples
// of spatial * patch (the VAE stride times the transformer's 2x2 patch).
export const FAMILIES = {
  builtin: { label: "built-in", channels: 16, temporal: 4, spatial: 4, patch: [1, 2, 2], fps: 8 },
  "wan2.1": { label: "Wan 2.1 VAE", channels: 16, temporal: 4, spatial: 8, patch: [1, 2, 2], fps: 16 },
  "wan2.2": { label: "Wan 2.2 VAE", channels: 48, temporal: 4, spatial: 16, patch: [1, 2, 2], fps: 24 },
};

// Released transformers (and the built-in one): the VAE family whose latents they sample, parameters, width, FFN
// width, layers. `match` tells one from its file name before the loader has run; after it has, the loader's own
// facts name the variant. Order matters: the first match wins.
export const MODELS = [
  { name: "Wan 2.1 T2V 1.3B", vae: "wan2.1", params: 1418996800, dim: 1536, ffn: 8960, layers: 30,
    match: /1[._-]?3b/i },
  { name: "Wan 2.2 TI2V 5B", vae: "wan2.2", params: 4999787712, dim: 3072, ffn: 14336, layers: 30,
    match: /ti2v|(^|[^0-9.])5b/i },
  { name: "Wan 2.2 I2V A14B (one expert)", vae: "wan2.1", params: 14288901184, dim: 5120, ffn: 13824,
    layers: 40, match: /2[._]2.*i2v.*14b|i2v.*a14b/i },
  { name: "Wan 2.2 A14B (one expert)", vae: "wan2.1", params: 14288491584, dim: 5120, ffn: 13824, layers: 40,
    match: /2[._]2.*14b|a14b/i },
  { name: "Wan 2.1 I2V 14B", vae: "wan2.1", params: 16394878784, dim: 5120, ffn: 13824, layers: 40,
    match: /i2v.*14b/i },
  { name: "Wan 2.1 T2V 14B", vae: "wan2.1", params: 14288491584, dim: 5120, ffn: 13824, layers: 40,
    match: /14b/i },
  { name: "built-in", vae: "builtin", params: 3963520, dim: 192, ffn: 768, layers: 6, match: /^builtin$/ },
];

const GIB = 1024 ** 3;

// Python's round(): halves go to the even neighbour. Snapping must agree with the backend's exactly.
export function roundHalfEven(x) {
  const f = Math.floor(x);
  const d = x - f;
  if (d > 0.5) return f + 1;
  if (d < 0.5) return f;
  return f % 2 === 0 ? f : f + 1;
}

export function sizeMultiple(family) {
  const g = FAMILIES[family];
  return g.spatial * Math.max(g.patch[1], g.patch[2]);
}

// Frames the causal VAE takes: 1 + temporal*k, the nearest to the request.
export function snapFrames(frames, temporal) {
  const value = 1 + temporal * Math.max(0, roundHalfEven((frames - 1) / temporal));
  return { value, note: value === frames ? null : `frames ${frames} → ${value} (the VAE takes ${temporal}k+1)` };
}

// A width or height the model takes: the nearest multiple; one under a single multiple cannot be rounded up
// honestly and is an error, as in the backend.
export function snapSize(value, multiple, name) {
  if (value < multiple) {
    return { value: multiple, note: null, error: `${name} ${value} is too small: this model needs at least ${multiple}` };
  }
  const snapped = Math.max(multiple, roundHalfEven(value / multiple) * multiple);
  return { value: snapped, note: snapped === value ? null : `${name} ${value} → ${snapped} (a multiple of ${multiple})`,
           error: null };
}

// [channels, latent frames, latent height, latent width] of a clip.
export function latentShape(family, frames, width, height) {
  const g = FAMILIES[family];
  return [g.channels, 1 + Math.floor((frames - 1) / g.temporal), Math.floor(height / g.spatial),
          Math.floor(width / g.spatial)];
}

export function tokenCount(shape, patch) {
  return Math.floor(shape[1] / patch[0]) * Math.floor(shape[2] / patch[1]) * Math.floor(shape[3] / patch[2]);
}

// Which released model a loader's choice is: from the loader's facts when it has run, else from the file name.
export function findModel(name, facts) {
  const named = facts?.variant || facts?.name;
  if (named) {
    const exact = MODELS.find((m) => m.name === named);
    if (exact) return { model: exact, guessed: false };
  }
  if (facts?.family === "builtin") return { model: MODELS.find((m) => m.vae === "builtin"), guessed: false };
  if (!name) return { model: null, guessed: true };
  const base = String(name).split(/[\\/]/).pop();
  return { model: MODELS.find((m) => m.match.test(base)) ?? null, guessed: true };
}

// The VAE family of a VAE loader's choice: its facts when it has run, else the file name.
export function findFamily(name, facts) {
  if (facts?.family && FAMILIES[facts.family]) return { family: facts.family, guessed: false };
  if (!name) return { family: null, guessed: true };
  if (name === "builtin") return { family: "builtin", guessed: false };
  return { family: /2[._]2/.test(String(name)) ? "wan2.2" : "wan2.1", guessed: true };
}

// Bytes per weight and per activation value for a loader's precision choice on a device (nodes/models.py
// compute_dtype: auto is fp32 on a CPU and 16 bits on a GPU; fp8 keeps the big weights in 8 bits).
export function precisionBytes(precision, deviceType) {
  const compute = { fp32: 4, bf16: 2, fp16: 2 }[precision] ?? (deviceType === "cpu" ? 4 : 2);
  return { weights: precision === "fp8" ? 1 : compute, activations: compute };
}

// Peak memory while sampling, roughly: the weights, plus per token the residual stream and modulation in fp32
// and, in the compute precision, the attention projections and the FFN's hidden layer (the widest moment of a
// block). Attention itself is computed in tiles (flash / memory-efficient), so it adds no tokens^2 term.
export function estimateMemory(model, tokens, batch, precision, deviceType) {
  const bytes = precisionBytes(precision, deviceType);
  const weights = model.params * bytes.weights;
  const perToken = bytes.activations * (2 * model.ffn + 8 * model.dim) + 4 * 4 * model.dim;
  const activations = tokens * batch * perToken;
  return { weights, activations, total: weights + activations };
}

export function formatBytes(n) {
  if (n >= GIB) return `${(n / GIB).toFixed(n >= 10 * GIB ? 0 : 1)} GB`;
  return `${Math.max(1, Math.round(n / 1024 ** 2))} MB`;
}

export function formatSeconds(s) {
  if (!Number.isFinite(s)) return "?";
  if (s < 10) return `${s.toFixed(1)} s`;
  if (s < 90) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  return `${m} min ${String(Math.round(s - 60 * m)).padStart(2, "0")} s`;
}

// The memory available where the model will run, from ComfyUI's /system_stats.
export function deviceMemory(stats, deviceChoice) {
  const gpu = stats?.devices?.[0];
  if (!stats) return null;
  if (deviceChoice === "cpu" || !gpu || gpu.type === "cpu") {
    return { type: "cpu", name: "CPU", total: stats.system?.ram_total, free: stats.system?.ram_free };
  }
  return { type: gpu.type, name: gpu.name ?? gpu.type, total: gpu.vram_total, free: gpu.vram_free };
}

// Everything the noise node shows. request: {family, frames, width, height, batch, fps, fpsFrom, model, precision,
// device (/system_stats entry from deviceMemory, or null)}.
export function makePlan(request) {
  const family = FAMILIES[request.family] ? request.family : "wan2.1";
  const g = FAMILIES[family];
  const mult = sizeMultiple(family);
  const notes = [];
  const errors = [];
  const frames = snapFrames(request.frames, g.temporal);
  if (frames.note) notes.push(frames.note);
  const sizes = [["width", request.width], ["height", request.height]].map(([name, v]) => {
    const s = snapSize(v, mult, name);
    if (s.note) notes.push(s.note);
    if (s.error) errors.push(s.error);
    return s.value;
  });
  const [width, height] = sizes;
  const shape = latentShape(family, frames.value, width, height);
  const tokens = tokenCount(shape, g.patch);
  const batch = Math.max(1, request.batch ?? 1);
  const fps = request.fps || g.fps;
  const plan = {
    family, frames: frames.value, width, height, batch, fps, fpsFrom: request.fps ? request.fpsFrom : "model default",
    duration: frames.value / fps, latentShape: [batch, ...shape], tokens, notes, errors, memory: null,
  };
  if (request.model) {
    const deviceType = request.device?.type ?? "cuda";
    plan.memory = { ...estimateMemory(request.model, tokens, batch, request.precision ?? "auto", deviceType),
                    model: request.model.name, device: request.device ?? null };
    if (request.model.vae !== family) {
      errors.push(`${request.model.name} samples ${FAMILIES[request.model.vae].label} latents, not those of the ` +
                  `${g.label}: connect its own VAE`);
    }
  }
  return plan;
}

// The plan as lines of text for the node, each {text, tone} with tone "plain" | "note" | "warn".
export function planLines(plan) {
  const lines = [];
  // One frame is a picture (a first frame to animate, say): it has no duration.
  lines.push({ text: plan.frames === 1 ? "1 frame: a picture" :
    `${plan.frames} frames = ${formatSeconds(plan.duration)} at ${plan.fps} fps` +
    (plan.fpsFrom ? ` (${plan.fpsFrom})` : ""), tone: "plain" });
  lines.push({ text: `${plan.width}×${plan.height} → latent ${plan.latentShape.join("×")}`, tone: "plain" });
  lines.push({ text: `${plan.tokens.toLocaleString("en-US")} tokens per clip`, tone: "plain" });
  const m = plan.memory;
  if (m) {
    let text = `≈ ${formatBytes(m.total)} peak while sampling (${m.model}`;
    text += m.device ? ` on ${m.device.name})` : ")";
    lines.push({ text, tone: "plain" });
    if (m.device?.total && m.total > m.device.total) {
      lines.push({ text: `more than the ${formatBytes(m.device.total)} this device has`, tone: "warn" });
    } else if (m.device?.free && m.total > m.device.free) {
      lines.push({ text: `more than the ${formatBytes(m.device.free)} free now`, tone: "note" });
    }
  }
  for (const n of plan.notes) lines.push({ text: n, tone: "note" });
  for (const e of plan.errors) lines.push({ text: e, tone: "warn" });
  return lines;
}
