// node --test: the plan arithmetic of js/plan.js (its agreement with the Python backend is tested from pytest,
// tests/test_browser.py, over every family and a grid of requests).
import assert from "node:assert/strict";
import { test } from "node:test";

import {
  FAMILIES, MODELS, deviceMemory, estimateMemory, findFamily, findModel, formatBytes, formatSeconds, latentShape,
  makePlan, planLines, roundHalfEven, sizeMultiple, snapFrames, snapSize, tokenCount,
} from "../../../js/plan.js";

test("roundHalfEven rounds halves to the even neighbour, like Python's round", () => {
  assert.deepEqual([0.5, 1.5, 2.5, 3.5, -0.5, 2.4, 2.6].map(roundHalfEven), [0, 2, 2, 4, 0, 2, 3]);
});

test("snapped frames are 4k+1 and the nearest such count", () => {
  for (let frames = 1; frames <= 200; frames++) {
    const { value, note } = snapFrames(frames, 4);
    assert.equal((value - 1) % 4, 0);
    assert.ok(Math.abs(value - frames) <= 2, `${frames} -> ${value}`);
    assert.equal(note === null, value === frames);
  }
  assert.equal(snapFrames(81, 4).note, null);
  assert.match(snapFrames(80, 4).note, /80 → 81/);
});

test("sizes snap to the nearest multiple and refuse one under a single multiple", () => {
  for (let v = 16; v <= 2000; v += 7) {
    const { value, error } = snapSize(v, 16, "width");
    assert.equal(error, null);
    assert.equal(value % 16, 0);
    assert.ok(Math.abs(value - v) <= 8);
  }
  assert.match(snapSize(8, 16, "height").error, /height 8 is too small: this model needs at least 16/);
  assert.equal(snapSize(832, 16, "width").note, null);
});

test("the size multiple is the VAE stride times the 2x2 patch", () => {
  assert.deepEqual(["builtin", "wan2.1", "wan2.2"].map(sizeMultiple), [8, 16, 32]);
});

test("Wan 2.1 at 832x480x81: latent 16x21x60x104 and 32,760 tokens", () => {
  // The documented Wan 2.1 geometry (ComfyUI: [B, 16, (length-1)//4+1, H/8, W/8]; patch 1x2x2).
  const shape = latentShape("wan2.1", 81, 832, 480);
  assert.deepEqual(shape, [16, 21, 60, 104]);
  assert.equal(tokenCount(shape, FAMILIES["wan2.1"].patch), 21 * 30 * 52);
  assert.deepEqual(latentShape("wan2.2", 121, 1280, 704), [48, 31, 44, 80]);
});

test("a plan: duration from the save node's fps, batch in the shape, notes for what was snapped", () => {
  const plan = makePlan({ family: "builtin", frames: 18, width: 60, height: 64, batch: 2, fps: 8, fpsFrom: "from Save" });
  assert.equal(plan.frames, 17);
  assert.equal(plan.width, 64);
  assert.equal(plan.duration, 17 / 8);
  assert.deepEqual(plan.latentShape, [2, 16, 5, 16, 16]);
  assert.equal(plan.tokens, 5 * 8 * 8);
  assert.equal(plan.notes.length, 2);
  const text = planLines(plan).map((l) => l.text);
  assert.ok(text.includes("17 frames = 2.1 s at 8 fps (from Save)"), text.join("\n"));
  assert.ok(text.some((t) => t.includes("latent 2×16×5×16×16")));
  assert.ok(planLines(plan).filter((l) => l.tone === "note").length === 2);
  const picture = planLines(makePlan({ family: "builtin", frames: 1, width: 64, height: 64, batch: 1, fps: 8 }));
  assert.equal(picture[0].text, "1 frame: a picture");
});

test("without a save node the family's frame rate is used", () => {
  const plan = makePlan({ family: "wan2.2", frames: 121, width: 1280, height: 704 });
  assert.equal(plan.fps, 24);
  assert.equal(plan.fpsFrom, "model default");
  assert.equal(plan.duration, 121 / 24);
});

test("models are found by their loader facts, else by file name", () => {
  const names = {
    "wan2.1_t2v_1.3B_fp16.safetensors": "Wan 2.1 T2V 1.3B",
    "wan2.1_t2v_14B_fp8_e4m3fn.safetensors": "Wan 2.1 T2V 14B",
    "wan2.1_i2v_480p_14B_bf16.safetensors": "Wan 2.1 I2V 14B",
    "wan2.2_t2v_high_noise_14B_fp8_scaled.safetensors": "Wan 2.2 A14B (one expert)",
    "wan2.2_i2v_low_noise_14B_fp16.safetensors": "Wan 2.2 I2V A14B (one expert)",
    "wan2.2_ti2v_5B_fp16.safetensors": "Wan 2.2 TI2V 5B",
    "sub/folder/wan2.2_ti2v_5B_fp16.safetensors": "Wan 2.2 TI2V 5B",
    builtin: "built-in",
  };
  for (const [file, name] of Object.entries(names)) assert.equal(findModel(file).model?.name, name, file);
  assert.equal(findModel("my_finetune.safetensors").model, null);
  const known = findModel("renamed.safetensors", { variant: "Wan 2.2 TI2V 5B", family: "wan2.2" });
  assert.deepEqual([known.model.name, known.guessed], ["Wan 2.2 TI2V 5B", false]);
  assert.equal(findFamily("wan2.2_vae.safetensors").family, "wan2.2");
  assert.equal(findFamily("wan_2.1_vae.safetensors").family, "wan2.1");
  assert.equal(findFamily("x.safetensors", { family: "builtin" }).family, "builtin");
});

test("memory: weights at the precision's width plus activations that grow with tokens", () => {
  const m = MODELS.find((x) => x.name === "Wan 2.1 T2V 1.3B");
  const bf16 = estimateMemory(m, 32760, 1, "auto", "cuda");
  assert.equal(bf16.weights, m.params * 2);
  assert.equal(estimateMemory(m, 32760, 1, "auto", "cpu").weights, m.params * 4);
  assert.equal(estimateMemory(m, 32760, 1, "fp8", "cuda").weights, m.params);
  const double = estimateMemory(m, 2 * 32760, 1, "auto", "cuda");
  assert.ok(Math.abs(double.activations - 2 * bf16.activations) < 1);
  assert.equal(estimateMemory(m, 32760, 2, "auto", "cuda").activations, double.activations);
  // The widest moment of a block holds at least the FFN's hidden layer for every token.
  assert.ok(bf16.activations >= 32760 * m.ffn * 2);
});

test("memory is compared with the device the model runs on", () => {
  const stats = { system: { ram_total: 64 * 2 ** 30, ram_free: 32 * 2 ** 30 },
                  devices: [{ name: "cuda:0 NVIDIA H100", type: "cuda", vram_total: 80 * 2 ** 30, vram_free: 5 * 2 ** 30 }] };
  assert.equal(deviceMemory(stats, "auto").total, 80 * 2 ** 30);
  assert.equal(deviceMemory(stats, "cpu").total, 64 * 2 ** 30);
  assert.equal(deviceMemory({ system: stats.system, devices: [{ type: "cpu", name: "cpu" }] }, "auto").type, "cpu");
  assert.equal(deviceMemory(null, "auto"), null);
  const m = MODELS.find((x) => x.name === "Wan 2.1 T2V 14B");
  const plan = makePlan({ family: "wan2.1", frames: 81, width: 1280, height: 720, model: m, precision: "auto",
                          device: deviceMemory(stats, "auto") });
  const lines = planLines(plan);
  assert.ok(lines.some((l) => l.tone === "note" && l.text.includes("free now")), JSON.stringify(lines));
  const small = { ...stats, devices: [{ ...stats.devices[0], vram_total: 8 * 2 ** 30, vram_free: 8 * 2 ** 30 }] };
  const tooBig = planLines(makePlan({ family: "wan2.1", frames: 81, width: 1280, height: 720, model: m,
                                      device: deviceMemory(small, "auto") }));
  assert.ok(tooBig.some((l) => l.tone === "warn" && l.text.includes("this device has")));
});

test("a model with another VAE's latents is flagged", () => {
  const m = MODELS.find((x) => x.name === "Wan 2.2 TI2V 5B");
  const plan = makePlan({ family: "wan2.1", frames: 81, width: 832, height: 480, model: m });
  assert.match(plan.errors[0], /samples Wan 2.2 VAE latents, not those of the Wan 2.1 VAE/);
});

test("numbers read the way people say them", () => {
  assert.equal(formatBytes(3 * 2 ** 30), "3.0 GB");
  assert.equal(formatBytes(300 * 2 ** 30), "300 GB");
  assert.equal(formatBytes(5 * 2 ** 20), "5 MB");
  assert.equal(formatSeconds(2.125), "2.1 s");
  assert.equal(formatSeconds(45), "45 s");
  assert.equal(formatSeconds(125), "2 min 05 s");
});
