// The browser test of the Zoetrope extension, in headless Chromium driven by playwright-core.
//
//   node tests/browser/editor.mjs CONFIG.json
//
// CONFIG (written by tests/test_browser.py): {url, extension, outDir, workflows: {name: ui-json}, previewWorkflow,
// events: [zoetrope.preview messages] | null, facts: {LoaderType: facts} | null, queue: {...} | null}.
// It opens the page on the frontend served at `url` (the test backend or a real ComfyUI), loads each workflow,
// converts it with the frontend's own app.graphToPrompt(), plays recorded preview events (test backend) or queues a
// workflow (real ComfyUI), takes PNG screenshots into outDir and writes what it saw to outDir/results.json; the
// pytest side makes the assertions. Nothing outside 127.0.0.1 is contacted: every other request is aborted.

import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";

import { chromium } from "playwright-core";

const config = JSON.parse(readFileSync(process.argv[2], "utf8"));
const results = { console: [], pageErrors: [], blocked: [], workflows: {}, steps: [] };
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));
const step = (name, data = {}) => results.steps.push({ name, ...data });

const browser = await chromium.launch({
  executablePath: config.chromium ?? "/usr/bin/chromium",
  args: ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"],
});

try {
  const context = await browser.newContext({ viewport: { width: 1500, height: 950 } });
  await context.route("**/*", (route) => {
    const host = new URL(route.request().url()).hostname;
    if (host === "127.0.0.1" || host === "localhost") return route.continue();
    results.blocked.push(route.request().url());
    return route.abort();
  });
  const page = await context.newPage();
  page.on("console", (m) => results.console.push({ type: m.type(), text: m.text().slice(0, 500),
                                                   url: m.location()?.url ?? "" }));
  page.on("pageerror", (e) => results.pageErrors.push(String(e?.stack ?? e).slice(0, 1000)));

  // A first visit opens the templates browser over the graph: say the tutorial is done, as a returning user has.
  await fetch(`${config.url}/api/settings/Comfy.TutorialCompleted`, { method: "POST", body: "true",
                                                                      headers: { "Content-Type": "application/json" } });
  await page.goto(config.url);
  await page.waitForFunction((name) => window.app?.extensions?.some?.((e) => e.name === name) && window.app.canvas?.graph,
                             "zoetrope.editor", { timeout: 90000 });
  await sleep(1500);
  await page.keyboard.press("Escape");

  // Helpers inside the page.
  await page.evaluate((extension) => {
    window.__z = {
      module: () => import(`/extensions/${extension}/zoetrope.js`),
      nodes: (graph = app.canvas.graph) => graph.nodes,
      byType: (type, graph = app.canvas.graph) => graph.nodes.find((n) => (n.comfyClass ?? n.type) === type),
      byId: (id, graph = app.canvas.graph) => graph.nodes.find((n) => String(n.id) === String(id)),
      // Every node in view, clear of the side bar, the tabs and the run button.
      fitView() {
        const nodes = app.canvas.graph.nodes;
        if (!nodes.length) return;
        const title = 30, rect = app.canvas.canvas.getBoundingClientRect();
        const box = { x: 80, y: 120, w: rect.width - 110, h: rect.height - 150 };
        const minX = Math.min(...nodes.map((n) => n.pos[0])), minY = Math.min(...nodes.map((n) => n.pos[1] - title));
        const maxX = Math.max(...nodes.map((n) => n.pos[0] + n.size[0]));
        const maxY = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
        const scale = Math.min(box.w / (maxX - minX), box.h / (maxY - minY), 1.25);
        app.canvas.ds.scale = scale;
        app.canvas.ds.offset = [(box.x + (box.w - (maxX - minX) * scale) / 2) / scale - minX,
                                (box.y + (box.h - (maxY - minY) * scale) / 2) / scale - minY];
        app.canvas.setDirty(true, true);
      },
      focus(node, zoom = 1.6) {
        const rect = app.canvas.canvas.getBoundingClientRect();
        app.canvas.ds.scale = zoom;
        app.canvas.ds.offset = [-node.pos[0] + (rect.width / zoom - node.size[0]) / 2,
                                -node.pos[1] + (rect.height / zoom - node.size[1]) / 2];
        app.canvas.setDirty(true, true);
      },
      clip(node) {
        const ds = app.canvas.ds, rect = app.canvas.canvas.getBoundingClientRect(), title = 30;
        return { x: Math.max(0, rect.left + (node.pos[0] + ds.offset[0]) * ds.scale - 6),
                 y: Math.max(0, rect.top + (node.pos[1] - title + ds.offset[1]) * ds.scale - 6),
                 width: node.size[0] * ds.scale + 12, height: (node.size[1] + title) * ds.scale + 12 };
      },
      // A fingerprint of the canvas pixels under a node: changes when what is drawn there changes.
      pixels(node) {
        const c = app.canvas.canvas, ds = app.canvas.ds, k = window.devicePixelRatio || 1;
        const x = Math.round((node.pos[0] + ds.offset[0]) * ds.scale * k);
        const y = Math.round((node.pos[1] + ds.offset[1]) * ds.scale * k);
        const w = Math.round(node.size[0] * ds.scale * k), h = Math.round(node.size[1] * ds.scale * k);
        const data = c.getContext("2d").getImageData(x, y, w, h).data;
        let hash = 0, lit = 0;
        for (let i = 0; i < data.length; i += 4) {
          hash = (hash * 31 + data[i] * 7 + data[i + 1] * 13 + data[i + 2]) >>> 0;
          if (data[i] + data[i + 1] + data[i + 2] > 60) lit++;
        }
        return { hash, lit };
      },
    };
  }, config.extension);

  const inspect = () => page.evaluate(async () => (await window.__z.module()).inspectZoetrope());
  // The whole page, or one node: the first of a type, or { id } for a given node.
  const shot = async (name, node) => {
    const path = join(config.outDir, `${name}.png`);
    if (node) {
      const clip = await page.evaluate((t) => window.__z.clip(t.id === undefined ? window.__z.byType(t)
                                                                                 : window.__z.byId(t.id)), node);
      await page.screenshot({ path, clip });
    } else {
      await page.screenshot({ path });
    }
    return path;
  };
  const emit = async (message) => {
    const r = await fetch(`${config.url}/test/emit`, { method: "POST", body: JSON.stringify(message),
                                                       headers: { "Content-Type": "application/json" } });
    if (!r.ok) throw new Error(`emit failed: ${r.status}`);
  };
  const load = (workflow, name) => page.evaluate(async ([wf, n]) => {
    await app.loadGraphData(structuredClone(wf), true, true, n);
  }, [workflow, name]);

  // 1. A page with none of our nodes (the frontend's default graph): nothing from us in the console.
  step("blank page", { inspect: await inspect(), console: results.console.length });

  // 2. Every workflow: loads without missing nodes or widgets; the frontend's API conversion.
  for (const [name, workflow] of Object.entries(config.workflows)) {
    await load(workflow, name);
    await sleep(400);
    await page.evaluate(() => window.__z.fitView());
    await sleep(300);
    results.workflows[name] = await page.evaluate(async () => {
      const nodes = app.canvas.graph.nodes.map((n) => ({
        id: String(n.id), type: n.comfyClass ?? n.type, registered: !!n.constructor?.nodeData || !!n.comfyClass,
        widgets: (n.widgets ?? []).map((w) => w.name), hasErrors: !!n.has_errors,
      }));
      const text = document.body.innerText;
      const missing = /missing/i.test(text) ? text.split("\n").filter((l) => /missing/i.test(l)).slice(0, 5) : [];
      const prompt = (await app.graphToPrompt()).output;
      return { nodes, missing, prompt };
    });
    results.workflows[name].screenshot = await shot(`workflow_${name}`);
  }

  const previewName = config.previewWorkflow;
  await load(config.workflows[previewName], previewName);
  await sleep(300);
  await page.evaluate(() => window.__z.fitView());
  await sleep(500);

  // 3. The plan on the noise node, then with sizes the model cannot take.
  const readPlan = () => page.evaluate(() => {
    const n = window.__z.byType("ZoetropeVideoNoise");
    return { lines: (n.zoetropePlanLines ?? []).map((l) => ({ ...l })), plan: n.zoetropePlan ?? null };
  });
  step("plan", await readPlan());
  await page.evaluate(() => window.__z.focus(window.__z.byType("ZoetropeVideoNoise"), 1.5));
  await sleep(400);
  await shot("plan", "ZoetropeVideoNoise");
  await page.evaluate(() => {
    const n = window.__z.byType("ZoetropeVideoNoise");
    for (const [name, value] of [["frames", 18], ["width", 70]]) {
      const w = n.widgets.find((x) => x.name === name);
      w.value = value;
      w.callback?.(value);
    }
    app.canvas.setDirty(true, true);
  });
  await sleep(500);
  step("plan snapped", await readPlan());
  await shot("plan_snapped", "ZoetropeVideoNoise");
  await page.evaluate(() => {
    const n = window.__z.byType("ZoetropeVideoNoise");
    for (const [name, value] of [["frames", 17], ["width", 64]]) n.widgets.find((x) => x.name === name).value = value;
    app.canvas.setDirty(true, true);
  });

  // 4. Loader facts, as ComfyUI delivers a node's `executed` output.
  if (config.facts) {
    for (const [type, facts] of Object.entries(config.facts)) {
      const id = await page.evaluate((t) => String(window.__z.byType(t).id), type);
      await emit({ type: "executed", data: { node: id, display_node: id, output: { zoetrope_model: [facts] },
                                             prompt_id: "test" } });
    }
    await sleep(600);
    step("facts", await page.evaluate((types) => Object.fromEntries(types.map((t) => {
      const n = window.__z.byType(t);
      return [t, (n.zoetropeFactLines ?? []).map((l) => l.text)];
    })), Object.keys(config.facts)));
    // The example workflows stack the loaders tightly: spread them so the screenshot shows each one's lines.
    await page.evaluate((types) => {
      types.forEach((t, i) => { window.__z.byType(t).pos[1] += 70 * i; });
      window.__z.focus(window.__z.byType(types[1]), 1.4);
    }, Object.keys(config.facts));
    await sleep(400);
    await shot("loaders");
  }

  // 5. The live preview, from recorded events.
  if (config.events) {
    const sampler = await page.evaluate(() => {
      const n = window.__z.byType("ZoetropeSampler");
      return { id: String(n.id), height: n.size[1] };
    });
    await page.evaluate(() => window.__z.focus(window.__z.byType("ZoetropeSampler"), 1.3));
    const half = Math.floor(config.events.length * 0.6);
    for (const e of config.events.slice(0, half)) {
      await emit({ type: "zoetrope.preview", data: { ...e, node: sampler.id } });
      await sleep(60);
    }
    await sleep(800);
    const samples = [];
    for (let i = 0; i < 8; i++) {
      samples.push({ ...(await inspect()).live[0], pixels: await page.evaluate(() =>
        window.__z.pixels(window.__z.byType("ZoetropeSampler"))) });
      await sleep(230);
    }
    const midShot = await shot("preview_mid_run", "ZoetropeSampler");
    await shot("preview_mid_run_page");
    for (const e of config.events.slice(half)) {
      await emit({ type: "zoetrope.preview", data: { ...e, node: sampler.id } });
      await sleep(30);
    }
    await sleep(500);
    const after = await page.evaluate(() => ({ height: window.__z.byType("ZoetropeSampler").size[1],
                                               liveId: window.__z.byType("ZoetropeSampler").zoetropeLiveId ?? null }));
    step("preview", { sampler, samples, after, inspectAfter: await inspect(), screenshot: midShot });
    await shot("preview_done", "ZoetropeSampler");

    // 6. The same inside a subgraph: the preview shows on the subgraph's node; the execution id is "outer:inner".
    const ids = await page.evaluate(() => {
      const n = window.__z.byType("ZoetropeSampler");
      const made = app.canvas.graph.convertToSubgraph(new Set([n]));
      const outer = made?.node ?? app.canvas.graph.nodes.find((x) => x.isSubgraphNode?.());
      const inner = outer.subgraph.nodes.find((x) => (x.comfyClass ?? x.type) === "ZoetropeSampler");
      return { outer: String(outer.id), inner: String(inner.id), outerType: outer.type };
    });
    const promptKeys = await page.evaluate(async () => Object.keys((await app.graphToPrompt()).output));
    const executionId = `${ids.outer}:${ids.inner}`;
    for (const e of config.events.slice(0, half)) {
      await emit({ type: "zoetrope.preview", data: { ...e, node: executionId } });
    }
    await sleep(800);
    const subLive = await inspect();
    await page.evaluate((id) => {
      const n = app.canvas.graph.getNodeById(Number(id));
      window.__z.focus(n, 1.3);
    }, ids.outer);
    await sleep(400);
    const subShot = join(config.outDir, "preview_in_subgraph.png");
    const clip = await page.evaluate((id) => window.__z.clip(app.canvas.graph.getNodeById(Number(id))), ids.outer);
    await page.screenshot({ path: subShot, clip });
    await emit({ type: "zoetrope.preview", data: { node: executionId, done: true } });
    await sleep(300);
    step("subgraph", { ids, executionId, promptKeys, live: subLive.live, after: (await inspect()).live });
  }

  // 7. After a graph reload (another workflow, then this one again) the plan is back on the new node.
  const other = Object.keys(config.workflows).find((n) => n !== previewName);
  await load(config.workflows[other], other);
  await sleep(300);
  await load(config.workflows[previewName], previewName);
  await sleep(800);
  step("reloaded", await readPlan());

  // 8. Real ComfyUI: queue a workflow and watch the preview animate and the video arrive.
  if (config.queue) {
    await page.evaluate((settings) => {
      window.__q = { previews: 0, withFrames: 0, done: false, error: null, shown: new Set(), maxFrames: 0 };
      for (const [type, values] of Object.entries(settings)) {
        for (const n of app.canvas.graph.nodes.filter((x) => (x.comfyClass ?? x.type) === type)) {
          for (const [name, value] of Object.entries(values)) {
            const w = n.widgets.find((x) => x.name === name);
            if (w) w.value = value;
          }
        }
      }
      const { api } = window.comfyAPI.api;
      api.addEventListener("zoetrope.preview", (e) => {
        window.__q.previews++;
        if (e.detail?.image) window.__q.withFrames++;
      });
      // Watch what the sampler node shows, from inside the page, every 50 ms.
      window.__z.module().then((m) => {
        const watch = setInterval(() => {
          const live = m.inspectZoetrope().live[0];
          if (live && live.shownFrame >= 0) window.__q.shown.add(live.shownFrame);
          window.__q.maxFrames = Math.max(window.__q.maxFrames, live?.frames ?? 0);
          if (window.__q.done || window.__q.error) clearInterval(watch);
        }, 50);
      });
      api.addEventListener("execution_success", () => { window.__q.done = true; });
      api.addEventListener("execution_error", (e) => { window.__q.error = JSON.stringify(e.detail).slice(0, 2000); });
    }, config.queue.set);
    await page.evaluate(() => window.__z.fitView());
    await page.evaluate(() => app.queuePrompt(0, 1));
    const deadline = Date.now() + (config.queue.timeoutMs ?? 240000);
    let midShot = null;
    while (Date.now() < deadline) {
      const q = await page.evaluate(async () => ({ ...window.__q, shown: [...window.__q.shown],
                                                   live: (await window.__z.module()).inspectZoetrope().live[0] }));
      if (!midShot && q.live?.loaded) {
        await sleep(700);
        await page.evaluate(() => window.__z.fitView());
        midShot = await shot("comfyui_preview_mid_run");
        // The sampler that is running (the workflow's first one may not have started yet).
        await shot("comfyui_sampler_mid_run", { id: q.live.nodes[0] });
      }
      if (q.done || q.error) break;
      await sleep(150);
    }
    await sleep(2500);
    await page.evaluate(() => window.__z.focus(window.__z.byType("ZoetropeModelLoader"), 1.3));
    await sleep(300);
    await shot("comfyui_loaders");
    await page.evaluate(() => window.__z.focus(window.__z.byType("ZoetropeVideoNoise"), 1.3));
    await sleep(300);
    await shot("comfyui_plan", "ZoetropeVideoNoise");
    const final = await page.evaluate(async () => {
      const save = window.__z.byType("ZoetropeSaveVideo");
      const videos = [...document.querySelectorAll("video")].map((v) => v.currentSrc || v.src);
      return { ...window.__q, shown: [...window.__q.shown], live: (await window.__z.module()).inspectZoetrope().live,
               videos, outputs: app.nodeOutputs?.[String(save.id)] ?? null };
    });
    await page.evaluate(() => window.__z.fitView());
    await sleep(500);
    final.screenshot = await shot("comfyui_finished");
    final.midShot = midShot;
    step("queued", final);
  }
} catch (error) {
  results.error = String(error?.stack ?? error);
} finally {
  writeFileSync(join(config.outDir, "results.json"), JSON.stringify(results, null, 1));
  await browser.close();
}
