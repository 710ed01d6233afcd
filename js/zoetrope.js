// Zoetrope's node editor extension.
//
// - ZoetropeSampler: while it runs, the video forming (every frame of the current estimate, sent by
//   nodes/preview.py as `zoetrope.preview` messages) loops in the node, under the step, seconds per step and time
//   left; it goes away when the sampler finishes.
// - ZoetropeVideoNoise: the generation plan, recomputed whenever a widget or a connection changes: duration, latent
//   shape, tokens, memory estimate for the connected model on this machine's device, and sizes that get snapped.
// - The loaders: what the loaded file is (family, variant, precision), from their `zoetrope_model` output.
//
// Everything is drawn on the node's canvas (onDrawForeground), which every frontend version since the start of
// LiteGraph calls; nothing depends on a setting. Only our node types are touched, and nothing is logged.

import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { decodePreview, fitRect, frameAt, frameRect, statusLine } from "./frames.js";
import { deviceMemory, findFamily, findModel, makePlan, planLines } from "./plan.js";

const NODES = new Set(["ZoetropeModelLoader", "ZoetropeTextEncoderLoader", "ZoetropeVAELoader", "ZoetropeTextEncode",
  "ZoetropeVideoNoise", "ZoetropeSampler", "ZoetropeVAEDecode", "ZoetropeVAEEncode", "ZoetropeSaveVideo"]);
const LOADERS = { ZoetropeModelLoader: "model_name", ZoetropeTextEncoderLoader: "text_encoder_name",
  ZoetropeVAELoader: "vae_name" };

const PAD = 8;
const LINE = 16;
const FONT = "12px Arial, sans-serif";
const TONES = { plain: "#b8b8b8", note: "#e8a33d", warn: "#ff6b6b", head: "#e8e8e8" };
const MAX_PREVIEW_HEIGHT = 360;
const REDRAW_MS = 100;

const live = new Map();            // execution id -> the sampler's progress and latest frames
const facts = new Map();           // "LoaderType:file" -> what the loader said the file is
let systemStats = null;
let statsAsked = false;
let ticking = false;

// ------------------------------------------------------------------------------------------------------------
// The graph: links, neighbours, execution ids (a node in a subgraph runs as "outer:inner")

const typeOf = (node) => node?.comfyClass ?? node?.type;
const linkById = (graph, id) => graph?.links?.get?.(id) ?? graph?.links?.[id] ?? graph?.getLink?.(id) ?? null;
const nodeById = (graph, id) => graph?.getNodeById?.(id) ?? null;
const widgetValue = (node, name) => node?.widgets?.find((w) => w.name === name)?.value;

// The node feeding an input, through reroutes.
function upstream(node, inputName) {
  let current = node;
  let name = inputName;
  for (let hops = 0; current && hops < 32; hops++) {
    const input = name == null ? current.inputs?.[0] : current.inputs?.find((i) => i.name === name);
    if (input?.link == null) return null;
    const link = linkById(current.graph, input.link);
    const origin = link ? nodeById(current.graph, link.origin_id) : null;
    if (typeOf(origin) !== "Reroute") return origin;
    current = origin;
    name = null;
  }
  return null;
}

// The nearest node downstream that `accept`s, breadth first.
function downstream(node, accept, depth = 12) {
  const seen = new Set([node]);
  let frontier = [node];
  for (let d = 0; d < depth && frontier.length; d++) {
    const next = [];
    for (const n of frontier) {
      for (const output of n.outputs ?? []) {
        for (const id of output.links ?? []) {
          const link = linkById(n.graph, id);
          const target = link ? nodeById(n.graph, link.target_id) : null;
          if (!target || seen.has(target)) continue;
          if (accept(target)) return target;
          seen.add(target);
          next.push(target);
        }
      }
    }
    frontier = next;
  }
  return null;
}

// The nodes an execution id names, outermost first (a subgraph's node, then the node inside it).
function nodesOf(executionId) {
  let graph = app.rootGraph ?? app.graph;
  const chain = [];
  for (const part of String(executionId).split(":")) {
    const node = nodeById(graph, Number(part)) ?? nodeById(graph, part);
    if (!node) return [];
    chain.push(node);
    graph = node.subgraph;
  }
  return chain;
}

function redraw() {
  app.canvas?.setDirty?.(true, false);
}

// Make room under the widgets for `extra` pixels of our drawing; returns the top of that area.
function makeRoom(node, extra) {
  const base = node.computeSize?.()[1] ?? node.size[1];
  const need = base + extra;
  if (node.size[1] < need) node.setSize([node.size[0], need]);
  return node.size[1] - extra;
}

function drawLines(ctx, node, lines, top) {
  ctx.save();
  ctx.font = FONT;
  ctx.textAlign = "left";
  ctx.textBaseline = "middle";
  lines.forEach((line, i) => {
    ctx.fillStyle = TONES[line.tone] ?? TONES.plain;
    ctx.fillText(line.text, PAD, top + LINE * i + LINE / 2, node.size[0] - 2 * PAD);
  });
  ctx.restore();
}

// ------------------------------------------------------------------------------------------------------------
// The live preview

function onPreview(event) {
  const message = decodePreview(event.detail);
  if (message.node == null) return;
  if (message.done) {
    finish(message.node);
    return;
  }
  let state = live.get(message.node);
  if (!state) {
    state = { id: message.node, frames: null, image: null, started: performance.now(), shownFrame: -1, draws: 0,
              nodes: [] };
    live.set(message.node, state);
  }
  Object.assign(state, { step: message.step, total: message.total, secondsPerStep: message.secondsPerStep,
                         eta: message.eta });
  const chain = nodesOf(message.node);
  // The sampler itself, and the subgraph node that holds it, so the preview shows on whichever is on screen.
  for (const node of new Set([chain.at(-1), chain[0]].filter(Boolean))) {
    if (state.nodes.includes(node)) continue;
    state.nodes.push(node);
    node.zoetropeLiveId = message.node;
    node.zoetropeHeightBefore = node.size[1];
    if (!NODES.has(typeOf(node)) && !node.zoetropeDrawsLive) {
      const own = node.onDrawForeground;
      node.onDrawForeground = function (ctx, ...rest) {
        own?.call(this, ctx, ...rest);
        drawLive(this, ctx);
      };
      node.zoetropeDrawsLive = true;
    }
  }
  if (message.frames) {
    const image = new Image();
    image.onload = () => {
      if (live.get(message.node) !== state) return;
      state.image = image;
      state.frames = message.frames;
      redraw();
    };
    image.src = message.frames.src;
  }
  startTicking();
  redraw();
}

function finish(id) {
  const state = live.get(id);
  if (!state) return;
  live.delete(id);
  for (const node of state.nodes) {
    if (node.zoetropeLiveId !== id) continue;
    delete node.zoetropeLiveId;
    if (node.zoetropeHeightBefore != null) node.setSize([node.size[0], node.zoetropeHeightBefore]);
    delete node.zoetropeHeightBefore;
  }
  redraw();
}

function finishAll() {
  for (const id of [...live.keys()]) finish(id);
}

function startTicking() {
  if (ticking) return;
  ticking = true;
  const tick = () => {
    if (!live.size) {
      ticking = false;
      return;
    }
    redraw();
    setTimeout(tick, REDRAW_MS);
  };
  setTimeout(tick, REDRAW_MS);
}

function drawLive(node, ctx) {
  const state = live.get(node.zoetropeLiveId);
  if (!state || node.flags?.collapsed) return;
  const width = node.size[0] - 2 * PAD;
  const f = state.frames;
  const boxHeight = f ? Math.min(MAX_PREVIEW_HEIGHT, (width * f.height) / f.width) : 0;
  const top = makeRoom(node, boxHeight + LINE + 2 * PAD);
  if (f && state.image) {
    const box = { x: PAD, y: top + PAD, w: width, h: boxHeight };
    const index = frameAt(f, performance.now() - state.started);
    const src = frameRect(f, index);
    const dst = fitRect(f.width, f.height, box);
    ctx.save();
    ctx.fillStyle = "#000";
    ctx.fillRect(box.x, box.y, box.w, box.h);
    ctx.imageSmoothingEnabled = true;
    ctx.drawImage(state.image, src.sx, src.sy, src.sw, src.sh, dst.x, dst.y, dst.w, dst.h);
    ctx.restore();
    state.shownFrame = index;
  }
  drawLines(ctx, node, [{ text: statusLine(state), tone: "head" }], top + PAD + boxHeight);
  state.draws += 1;
}

// ------------------------------------------------------------------------------------------------------------
// Loader facts

function factsOf(node) {
  const type = typeOf(node);
  const name = widgetValue(node, LOADERS[type]);
  return type in LOADERS && name != null ? facts.get(`${type}:${name}`) ?? null : null;
}

// Two lines, as `zoetrope inspect` names the file: what it is, then family, stored precision and device.
function factLines(f) {
  const parts = [];
  if (f.family) parts.push(f.family);
  if (f.variant && f.variant !== f.name) parts.push(f.variant);
  if (f.precision) parts.push(`${f.precision} file`);
  if (f.device) parts.push(`on ${f.device}`);
  return [{ text: f.name ?? f.file, tone: "head" }, ...(parts.length ? [{ text: parts.join(" · "), tone: "plain" }] : [])];
}

function drawFacts(node, ctx) {
  const f = factsOf(node);
  if (!f) return;
  const lines = factLines(f);
  node.zoetropeFactLines = lines;
  const top = makeRoom(node, lines.length * LINE + PAD);
  drawLines(ctx, node, lines, top);
}

// ------------------------------------------------------------------------------------------------------------
// The generation plan

function askSystemStats() {
  if (statsAsked) return;
  statsAsked = true;
  api.fetchApi("/system_stats")
    .then((r) => (r.ok ? r.json() : null))
    .then((stats) => {
      systemStats = stats;
      redraw();
    })
    .catch(() => {});
}

function planRequest(node) {
  const vaeNode = upstream(node, "vae");
  const sampler = downstream(node, (n) => typeOf(n) === "ZoetropeSampler");
  const modelNode = sampler ? upstream(sampler, "model") : null;
  const found = findModel(widgetValue(modelNode, "model_name"), factsOf(modelNode));
  let { family } = findFamily(widgetValue(vaeNode, "vae_name"), factsOf(vaeNode));
  const assumed = !family;
  family = family ?? found.model?.vae ?? "wan2.1";
  const fpsNode = downstream(node, (n) => n.widgets?.some((w) => w.name === "fps"));
  return {
    family, assumed,
    frames: Number(widgetValue(node, "frames")), width: Number(widgetValue(node, "width")),
    height: Number(widgetValue(node, "height")), batch: Number(widgetValue(node, "batch") ?? 1),
    fps: fpsNode ? Number(widgetValue(fpsNode, "fps")) : null,
    fpsFrom: fpsNode ? `from ${fpsNode.title || typeOf(fpsNode)}` : null,
    model: found.model, precision: widgetValue(modelNode, "precision") ?? "auto",
    device: deviceMemory(systemStats, widgetValue(modelNode, "device")),
  };
}

function drawPlan(node, ctx) {
  askSystemStats();
  const request = planRequest(node);
  const key = JSON.stringify(request);
  if (key !== node.zoetropePlanKey) {
    node.zoetropePlanKey = key;
    node.zoetropePlan = makePlan(request);
    node.zoetropePlanLines = planLines(node.zoetropePlan);
    if (request.assumed) {
      node.zoetropePlanLines.push({ text: `no VAE connected: assuming the ${node.zoetropePlan.family} geometry`,
                                    tone: "note" });
    }
  }
  const lines = node.zoetropePlanLines;
  const top = makeRoom(node, lines.length * LINE + PAD);
  drawLines(ctx, node, lines, top);
}

// ------------------------------------------------------------------------------------------------------------

app.registerExtension({
  name: "zoetrope.editor",

  setup() {
    api.addEventListener("zoetrope.preview", onPreview);
    for (const ended of ["execution_error", "execution_interrupted", "execution_success"]) {
      api.addEventListener(ended, finishAll);
    }
  },

  async beforeRegisterNodeDef(nodeType, nodeData) {
    const type = nodeData?.name;
    if (!NODES.has(type)) return;
    const draw = { ZoetropeSampler: drawLive, ZoetropeVideoNoise: drawPlan }[type] ?? (type in LOADERS ? drawFacts : null);
    if (draw) {
      const own = nodeType.prototype.onDrawForeground;
      nodeType.prototype.onDrawForeground = function (ctx, ...rest) {
        own?.call(this, ctx, ...rest);
        if (!this.flags?.collapsed) draw(this, ctx);
      };
    }
    if (type in LOADERS) {
      const own = nodeType.prototype.onExecuted;
      nodeType.prototype.onExecuted = function (output) {
        own?.call(this, output);
        const f = output?.zoetrope_model?.[0];
        if (f) {
          facts.set(`${type}:${f.file ?? widgetValue(this, LOADERS[type])}`, f);
          statsAsked = false;         // free memory changed: read it again for the plan
          redraw();
        }
      };
    }
  },
});

// For the browser tests: what the extension holds, by execution id and loader file.
export function inspectZoetrope() {
  return {
    live: [...live.values()].map((s) => ({ id: s.id, step: s.step, total: s.total, eta: s.eta,
                                           secondsPerStep: s.secondsPerStep, frames: s.frames?.count ?? 0,
                                           loaded: !!s.image, shownFrame: s.shownFrame, draws: s.draws,
                                           nodes: s.nodes.map((n) => String(n.id)) })),
    facts: Object.fromEntries(facts),
    systemStats: !!systemStats,
  };
}
