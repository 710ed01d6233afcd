"""The built-in model: its training command (a smoke run of every stage), its loading through the public loaders,
and `zoetrope generate` end to end on it."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch
import tqdm

from zoetrope import cli
from zoetrope.pipeline import builtin
from zoetrope.pipeline import generate as gen
from zoetrope.pipeline import load_text_encoder, load_transformer, load_vae, ops
from zoetrope.pipeline.video_io import read_tags, read_video
from zoetrope.pipeline.world import scene as world
from zoetrope.pipeline.world import train


def quiet(*_):
    """A progress bar that shows nothing (the stages' `progress` argument)."""
    return tqdm.tqdm(disable=True)


def test_training_smoke_run_writes_files_the_public_loaders_read(tmp_path):
    out = tmp_path / "out"
    assert train.main(["--smoke", "--work", str(tmp_path / "work"), "--out", str(out), "--threads", "1"]) == 0
    names = {"zoetrope_builtin_transformer.safetensors", "zoetrope_builtin_vae.safetensors",
             "zoetrope_builtin_text_encoder.safetensors"}
    assert {p.name for p in out.iterdir()} == names
    dit = load_transformer(out / "zoetrope_builtin_transformer.safetensors")
    vae = load_vae(out / "zoetrope_builtin_vae.safetensors")
    te = load_text_encoder(out / "zoetrope_builtin_text_encoder.safetensors")
    assert dit.info.family == vae.info.family == te.info.family == "builtin"
    assert dit.config == train.DIT_CONFIG
    # The latent statistics measured in training travel in the VAE file (and in the transformer's, for samplers
    # that have no VAE at hand).
    assert len(vae.config.latents_mean) == vae.z_dim and all(s > 0 for s in vae.config.latents_std)
    assert dit.info.settings["latents_mean"] == pytest.approx(list(vae.config.latents_mean))
    # The tokenizer trained on the world's text is inside the text-encoder file and knows the world's words.
    assert te.tokenizer.unknown_words(world.prompt(world.sample_scene(np.random.default_rng(0), 2))) == []
    # Every stage left a finished marker, so a second run resumes instead of training again.
    assert sorted(p.name for p in (tmp_path / "work").glob("*.done")) == [
        "decoder.done", "latents.done", "transformer.done", "vae.done", "wide-decoder.done"]


def test_an_unfinished_stage_resumes_from_its_checkpoint(tmp_path):
    work = tmp_path / "work"
    args = ["--smoke", "--work", str(work), "--out", str(tmp_path / "out"), "--only", "vae", "--threads", "1"]
    train.main(args + ["--vae-steps", "2"])
    first = torch.load(work / "vae.pt", weights_only=False)
    assert first["step"] == 2 and (work / "vae.done").exists()
    # A longer budget: the stage is unfinished again, and the next run continues from step 2 rather than 0.
    (work / "vae.done").unlink()
    train.main(args + ["--vae-steps", "3"])
    resumed = torch.load(work / "vae.pt", weights_only=False)
    assert resumed["step"] == 3
    changed = [k for k in first["model"] if not torch.equal(first["model"][k], resumed["model"][k])]
    assert changed, "the resumed run trained one more step"


def test_the_transformer_stage_runs_in_two_halves_that_resume_one_another(tmp_path):
    work = tmp_path / "work"
    args = ["--smoke", "--work", str(work), "--out", str(tmp_path / "out"), "--threads", "1", "--dit-steps", "4"]
    train.main(args + ["--only", "transformer-1"])
    first = torch.load(work / "transformer.pt", weights_only=False)
    assert first["step"] == 2 and not (work / "transformer.done").exists()
    train.main(args + ["--only", "transformer-2"])
    assert torch.load(work / "transformer.pt", weights_only=False)["step"] == 4 and (work / "transformer.done").exists()
    log_text = (work / "train.log").read_text()
    assert "transformer-1 (to step 2) done" in log_text and "transformer-2 (to step 4) done" in log_text


def test_builtin_model_generates_a_clip_of_the_requested_shape(builtin_model_dir):
    dit = load_transformer(builtin_model_dir / "zoetrope_builtin_transformer.safetensors")
    vae = load_vae(builtin_model_dir / "zoetrope_builtin_vae.safetensors")
    te = load_text_encoder(builtin_model_dir / "zoetrope_builtin_text_encoder.safetensors")
    frames = gen.generate(dit, vae, te, "a small red circle moving right on a black background", steps=4, seed=1)
    assert frames.shape == (17, 64, 64, 3) and frames.dtype == torch.float32
    assert 0 <= frames.min() and frames.max() <= 1
    again = gen.generate(dit, vae, te, "a small red circle moving right on a black background", steps=4, seed=1)
    assert torch.equal(frames, again)


def test_image_to_video_keeps_the_first_frame(builtin_model_dir):
    dit = load_transformer(builtin_model_dir / "zoetrope_builtin_transformer.safetensors")
    vae = load_vae(builtin_model_dir / "zoetrope_builtin_vae.safetensors")
    te = load_text_encoder(builtin_model_dir / "zoetrope_builtin_text_encoder.safetensors")
    scene = world.sample_scene(np.random.default_rng(3), 1)
    first = torch.from_numpy(world.render(scene, 64, 1)).float() / 255                       # [1, 64, 64, 3]
    frames = gen.generate(dit, vae, te, world.prompt(scene), first_frame=first, steps=3, seed=2)
    # The first latent frame is pinned, so the first decoded frame is the VAE's reconstruction of the image.
    with torch.no_grad():
        z = vae.encode(gen.frames_to_video(first))
        recon = gen.video_to_frames(vae.decode(z))[0]
    assert torch.allclose(frames[0], recon, atol=1e-4)


def test_frame_counts_and_sizes_are_snapped_with_a_note(builtin_model_dir):
    vae = load_vae(builtin_model_dir / "zoetrope_builtin_vae.safetensors")
    p = gen.plan(vae, frames=16, width=70, height=60)
    assert (p.frames, p.width, p.height) == (17, 72, 64)     # multiples of 8: the VAE stride 4 x patch 2
    assert any("frames 16 -> 17" in n for n in p.notes) and any("width 70 -> 72" in n for n in p.notes)
    with pytest.raises(ValueError, match="too small"):
        gen.plan(vae, frames=17, width=4, height=64)


def test_generate_command_writes_a_video_that_carries_its_graph(builtin_model, tmp_path, caplog):
    out = tmp_path / "clip.mp4"
    prompt = "a large blue square moving up on a white background"
    assert cli.main(["generate", prompt, "-o", str(out), "--steps", "3", "--seed", "5"]) == 0
    frames = read_video(out)
    assert frames.shape == (17, 64, 64, 3)
    graph = json.loads(read_tags(out)["prompt"])
    texts = [n["inputs"]["text"] for n in graph.values() if n["class_type"] == "ZoetropeTextEncode"]
    assert prompt in texts
    # A second run never overwrites the first file.
    assert cli.main(["generate", prompt, "-o", str(out), "--steps", "2"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clip.mp4", "clip_00001.mp4"]


def test_generate_warns_about_words_outside_the_world(builtin_model, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert cli.main(["generate", "a small red zebra moving right on a black background", "-o",
                     str(tmp_path / "z.gif"), "--steps", "1"]) == 0
    assert "zebra" in caplog.text and (tmp_path / "z.gif").is_file()


def test_generate_refuses_an_unknown_format(builtin_model, tmp_path):
    with pytest.raises(SystemExit):
        cli.main(["generate", "a small red circle", "-o", str(tmp_path / "clip.avi")])
    assert not list(tmp_path.iterdir())


def test_training_computes_in_bf16_only_where_the_hardware_has_it(monkeypatch):
    # Emulated bf16 (an AVX2-only CPU) made a training step fifteen times slower than fp32.
    assert ops.bf16_native(torch.device("cpu")) in (True, False)
    for native, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        monkeypatch.setattr(ops, "bf16_native", lambda device, native=native: native)
        with train._autocast(torch.device("cpu")):
            assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == dtype


def test_an_avx512_cpu_without_bf16_instructions_trains_in_fp32(monkeypatch):
    # oneDNN accepts bf16 on any AVX-512 CPU, but converts where the bf16 dot products are missing: slower than fp32.
    cpu = torch.device("cpu")
    try:       # the answer is cached per device: clear it around the patched checks, and after them
        ops.bf16_native.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
        assert not ops.bf16_native(cpu)
        ops.bf16_native.cache_clear()
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True)
        assert ops.bf16_native(cpu)
    finally:
        monkeypatch.undo()
        ops.bf16_native.cache_clear()


def test_the_transformer_loss_weighs_object_positions_above_the_background():
    x0 = torch.randn(1, 16, 1, 1, 1).expand(2, 16, 5, 16, 16).clone()     # a flat background latent
    x0[0, :, :, 3:5, 6:8] += 3.0                                           # an object in clip 0 only
    w = train._latent_object_weight(x0, 4.0)
    assert w.shape == (2, 1, 5, 16, 16)
    assert torch.allclose(w[0, :, :, 3:5, 6:8], torch.tensor(5.0))
    assert torch.allclose(w[0, :, :, :3], torch.tensor(1.0)) and torch.allclose(w[1], torch.tensor(1.0))
    assert torch.equal(train._latent_object_weight(x0, 0.0), torch.ones_like(w))


def test_the_shape_probe_loss_rewards_a_latent_that_names_each_cells_shape():
    probe = train.ShapeProbe(16)
    maps = torch.zeros(1, 1, 16, 16, dtype=torch.long)
    maps[0, 0, 4:12, 4:12] = 1 + world.SHAPES.index("square")                 # one square, 8x8 pixels
    direction = torch.nn.functional.normalize(probe.read.weight.detach(), dim=1)   # [4, 16]
    coded = torch.zeros(1, 16, 1, 4, 4)
    coded[0, :, 0] = 6 * direction[0].view(16, 1, 1)                           # background everywhere ...
    coded[0, :, 0, 1:3, 1:3] = 6 * direction[1 + world.SHAPES.index("square")].view(16, 1, 1)   # ... a square here
    wrong = coded.clone()
    wrong[0, :, 0, 1:3, 1:3] = 6 * direction[1 + world.SHAPES.index("circle")].view(16, 1, 1)
    right_loss = train._shape_probe_loss(probe, coded, maps, tc=4, sc=4)
    assert right_loss < 0.2 < 2.0 < train._shape_probe_loss(probe, wrong, maps, tc=4, sc=4)


def test_a_vae_trained_with_the_shape_probe_keeps_it_and_loads_as_finished_without_it(tmp_path):
    budget = replace(train.SMOKE, vae_steps=2, vae_shape_probe=0.5)
    train.train_vae(tmp_path, budget, 0, torch.device("cpu"), quiet)
    state = torch.load(tmp_path / "vae.pt", weights_only=False)
    assert set(state["probe"]) == {"read.weight", "read.bias"}
    # A later stage (or a benchmark) asks for the finished VAE with the default budget: it loads, no optimiser.
    vae = train.train_vae(tmp_path, train.SMOKE, 0, torch.device("cpu"), None)
    assert all(torch.equal(vae.state_dict()[k], v) for k, v in state["model"].items())


def test_the_decoder_blur_spreads_each_cell_to_its_neighbours_within_its_own_frame():
    z = torch.zeros(1, 2, 2, 6, 6)
    z[0, 0, 1, 2, 3] = 16.0                                  # one cell of one channel in the second frame
    z[0, 1] = 5.0                                            # a flat code (a background) in the other channel
    blurred = train._blur_latent(z)
    assert blurred.shape == z.shape
    assert torch.equal(blurred[0, 0, 1, 1:4, 2:5], torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]))
    assert blurred[0, 0, 1].sum() == 16 and not blurred[0, 0, 0].any()      # nothing leaks into the other frame
    assert torch.allclose(blurred[0, 1], torch.tensor(5.0))                  # a flat code stays as it is, edges too


def test_the_vae_stage_decodes_blurred_latents_on_the_share_of_steps_asked_for(tmp_path, monkeypatch):
    calls = []
    blur = train._blur_latent
    monkeypatch.setattr(train, "_blur_latent", lambda z: calls.append(z.shape) or blur(z))
    (tmp_path / "off").mkdir()
    (tmp_path / "on").mkdir()
    train.train_vae(tmp_path / "off", replace(train.SMOKE, vae_steps=3, vae_decoder_blur=0.0), 0,
                    torch.device("cpu"), quiet)
    assert calls == []
    train.train_vae(tmp_path / "on", replace(train.SMOKE, vae_steps=3, vae_decoder_blur=1.0), 0,
                    torch.device("cpu"), quiet)
    assert len(calls) == 3 and all(s[1] == train.VAE_CONFIG.z_dim for s in calls)


def test_free_start_clips_move_the_prompts_way_from_anywhere_in_the_frame():
    from zoetrope.pipeline.world import evaluate
    rng = np.random.default_rng(5)
    seen = {}
    for i in range(240):
        scene = train._free_start(rng, world.sample_scene(rng, 1 + i % 2))
        # Every clip is judged right by the world's evaluator: the objects stay in the frame and apart, their travel
        # is never mistaken for standing still, and each moves the way its words say.
        assert evaluate.score(world.render(scene), world.prompt(scene))["correct"], world.prompt(scene)
        for obj in scene.objects:
            if obj.motion in ("moving left", "moving right"):
                seen.setdefault((len(scene.objects), obj.motion), []).append(obj.start[0])
    # The direction can no longer be read off the start: both directions start on both halves of the frame, for
    # single objects and for pairs.
    assert len(seen) == 4
    for starts in seen.values():
        assert min(starts) < 0.4 and max(starts) > 0.6, seen
    # Scenes of the world itself keep their full travel and their side of the frame.
    assert all(o.travel == world.TRAVEL for _ in range(10) for o in world.sample_scene(rng, 2).objects)


def test_the_builtin_model_draws_the_first_frame_as_a_picture_and_animates_it(builtin_model, tmp_path):
    prompt = "a large blue square moving up on a white background"
    out = tmp_path / "clip.mp4"
    assert cli.main(["generate", prompt, "-o", str(out), "--steps", "2", "--seed", "5"]) == 0     # the default
    assert read_video(out).shape == (17, 64, 64, 3)
    graph = json.loads(read_tags(out)["prompt"])
    samplers = {k: n["inputs"] for k, n in graph.items() if n["class_type"] == "ZoetropeSampler"}
    clip = next(s for s in samplers.values() if "first_frame" in s)
    picture = samplers[clip["first_frame"][0]]
    noise = graph[picture["latent"][0]]["inputs"]
    assert noise["frames"] == 1 and noise["seed"] == 5 and picture["positive"] == clip["positive"]
    # The picture is drawn with the built-in model's picture settings; --cfg and --solver are the clip's.
    assert {k: picture[k] for k in builtin.PICTURE} == builtin.PICTURE
    assert (clip["cfg"], clip["solver"]) == (0.0, "auto")
    guided = tmp_path / "guided.mp4"
    assert cli.main(["generate", prompt, "-o", str(guided), "--steps", "2", "--cfg", "3", "--solver", "euler"]) == 0
    samplers = [n["inputs"] for n in json.loads(read_tags(guided)["prompt"]).values()
                if n["class_type"] == "ZoetropeSampler"]
    assert sorted((s["cfg"], s["solver"]) for s in samplers) == sorted(
        [(3.0, "euler"), (builtin.PICTURE["cfg"], builtin.PICTURE["solver"])])
    # --no-image-first samples the clip in one go; --image gives the first frame, so it cannot be drawn too.
    single = tmp_path / "single.mp4"
    assert cli.main(["generate", prompt, "-o", str(single), "--steps", "2", "--no-image-first"]) == 0
    graph = json.loads(read_tags(single)["prompt"])
    (sampler,) = [n["inputs"] for n in graph.values() if n["class_type"] == "ZoetropeSampler"]
    assert "first_frame" not in sampler
    with pytest.raises(SystemExit):
        cli.main(["generate", prompt, "-o", str(out), "--image", str(out), "--image-first"])

    # The evaluator's version: each clip starts on its picture, decoded alone.
    from zoetrope.pipeline.world import evaluate, report
    dit = load_transformer(builtin_model / "zoetrope_builtin_transformer.safetensors")
    vae = load_vae(builtin_model / "zoetrope_builtin_vae.safetensors")
    te = load_text_encoder(builtin_model / "zoetrope_builtin_text_encoder.safetensors")
    settings = dict(seed=5, steps=2, cfg=4.0, shift=3.0, solver="unipc")
    clips = report.generate_clips(dit, vae, te, [prompt], None, image_first=True, picture=builtin.PICTURE,
                                  **settings)
    with torch.no_grad():
        noise = gen.seeded_noise((1, *gen.plan(vae, 1, 64, 64).latent_shape), 5)
        x = gen.sample(dit, noise, te.encode([prompt]), te.encode([""]), **{**settings, **builtin.PICTURE})
        alone = evaluate.to_frames(vae.decode(vae.denormalize(x))[0])
    assert np.abs(clips[0, 0].astype(int) - alone[0].astype(int)).max() <= 1
    plain = report.generate_clips(dit, vae, te, [prompt], None, **settings)
    assert np.abs(plain[0, 0].astype(int) - alone[0].astype(int)).max() > 1


def test_transformer_probe_reports_word_use_travel_pictures_shape_codes_and_binding(builtin_model_dir, capsys,
                                                                                   monkeypatch, tmp_path):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import transformer_probe
    # A shape probe that reads every latent cell as a triangle, saved as the VAE stage saves its checkpoint.
    probe = train.ShapeProbe(16)
    with torch.no_grad():
        probe.read.weight.zero_()
        probe.read.bias.copy_(torch.tensor([-9.0, -9.0, -9.0, 9.0]))
    torch.save({"probe": probe.state_dict()}, tmp_path / "vae.pt")
    transformer_probe.main(["--folder", str(builtin_model_dir), "--clips", "3", "--levels", "0.5,1.0",
                            "--vae-checkpoint", str(tmp_path / "vae.pt"), "--prompts", "200"])
    out = capsys.readouterr().out
    words = [line for line in out.splitlines() if line.strip().startswith("noise") and "loss" in line]
    travel = [line for line in out.splitlines() if line.strip().startswith("noise") and "/" in line]
    assert len(words) == 2 and all(a in words[0] for a in ("colour", "shape", "size", "motion"))
    assert len(travel) == 2
    pictures = out.split("pictures:")[1].split("shape codes")[0].splitlines()[1:]
    assert [line.split("  ")[1].strip() for line in pictures] == [
        "VAE round trip", "one step from 0.50", "one step from 1.00", "drawn from noise"]
    assert all("fill" in line and "%" in line for line in pictures)
    # The seed's three scenes move: two triangles and a circle. Every latent frame's code reads as a triangle.
    codes = out.split("shape codes")[1].split("binding:")[0].splitlines()[1:]
    assert [line.split()[:2] for line in codes] == [["circle", "1"], ["triangle", "2"]]
    assert "codes   0% /   0%" in codes[0] and "codes 100% / 100%" in codes[1]
    binding = out.split("binding:")[1].splitlines()
    assert "150 two-object prompts fitted, 50 held out" in binding[0]
    assert [line.split(":")[0].strip() for line in binding[1:]] == [
        "object's motion from its colour word", "object's colour from its motion words"]
    assert all(0 <= int(line.split(":")[1].strip().rstrip("%")) <= 100 for line in binding[1:])
    torch.save({"model": {}}, tmp_path / "no_probe.pt")
    with pytest.raises(SystemExit, match="no shape probe"):
        transformer_probe.main(["--folder", str(builtin_model_dir), "--clips", "1", "--levels", "1.0",
                                "--vae-checkpoint", str(tmp_path / "no_probe.pt")])
    # --only runs the probes named.
    transformer_probe.main(["--folder", str(builtin_model_dir), "--clips", "2", "--levels", "1.0", "--only", "words"])
    out = capsys.readouterr().out
    assert out.startswith("words:") and "pictures:" not in out and "directions:" not in out
    with pytest.raises(SystemExit):
        transformer_probe.main(["--folder", str(builtin_model_dir), "--only", "colours"])
    with pytest.raises(SystemExit):     # asked for by name, the shape-code probe needs the VAE's checkpoint
        transformer_probe.main(["--folder", str(builtin_model_dir), "--only", "shape-codes"])
    with pytest.raises(SystemExit, match="pass --folder"):
        transformer_probe.main(["--folder", str(tmp_path)])


def test_picture_training_benchmark_trains_measures_and_remeasures_the_same(tmp_path, capsys, monkeypatch):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import picture_training
    work, out = tmp_path / "work", tmp_path / "run"
    assert train.main(["--smoke", "--work", str(work), "--out", str(tmp_path / "x"), "--only", "transformer-1",
                       "--dit-steps", "2", "--threads", "1"]) == 0
    args = ["--work", str(work), "--out", str(out), "--steps", "3", "--batch", "2", "--scenes", "3",
            "--settings", "euler:2:3:1,unipc:3:8:2"]
    picture_training.main(args)
    first = json.loads((out / "results.json").read_text())
    printed = capsys.readouterr().out
    assert "trained 3 steps" in printed and printed.count("words at noise") == 4
    assert list(first) == ["VAE round trip", "one step from 0.5", "one step from 0.8", "one step from 0.95",
                           "SDEdit denoise 0.5", "SDEdit denoise 0.7", "SDEdit denoise 0.85", "SDEdit denoise 0.95",
                           "  estimate at 1.00", "drawn euler:2:3:1", "drawn unipc:3:8:2"]   # the first path's estimate
    assert all(0 <= r["shape"] <= 1 and set(r["per_shape"]) == set(world.SHAPES) for r in first.values())
    assert (out / "drawn.png").stat().st_size > 0
    picture_training.main(args + ["--eval-only"])       # the saved model measures the same
    assert json.loads((out / "results.json").read_text()) == first


def test_picture_training_can_keep_to_one_object_scenes(tmp_path, monkeypatch):
    from pathlib import Path
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import picture_training
    from zoetrope.pipeline.tokenizer import Tokenizer
    counts, real = [], train._flow_loss
    monkeypatch.setattr(train, "_flow_loss", lambda dit, encoder, tokenizer, x0, scenes, *a, **k: (
        counts.extend(len(s.objects) for s in scenes) or real(dit, encoder, tokenizer, x0, scenes, *a, **k)))
    rng = np.random.default_rng(0)
    pool = {"latents": [torch.randn(6, 16, 2, 4, 4)], "scenes": [world.sample_scene(rng, n) for n in (1, 2, 1, 2, 2, 1)]}
    tokenizer = Tokenizer.from_bytes(train.train_tokenizer(tmp_path, 0, train.TEXT_CONFIG.vocab_size))
    picture_training.train_pictures(pool, tokenizer, train.SMOKE, train.DIT_CONFIG, steps=2, batch=8, one_object=True)
    assert len(counts) == 16 and set(counts) == {1}
    counts.clear()
    picture_training.train_pictures(pool, tokenizer, train.SMOKE, train.DIT_CONFIG, steps=2, batch=8)
    assert set(counts) == {1, 2}


def test_the_outline_weight_adds_most_on_an_objects_edge_cells():
    x0 = torch.randn(1, 16, 1, 1, 1).expand(1, 16, 2, 16, 16).clone()     # a flat background latent
    x0[0, :, 1, 4:10, 4:10] += 3.0                                         # a 6x6-cell object in frame 1 only
    plain, outlined = train._latent_object_weight(x0, 4.0), train._latent_object_weight(x0, 4.0, outline=8.0)
    extra = (outlined - plain)[0, 0]
    edge = torch.zeros(2, 16, 16, dtype=torch.bool)
    edge[1, 3:11, 3:11] = True
    edge[1, 5:9, 5:9] = False                                              # cells beside the boundary, both sides,
    edge[1, 3:11:7, 3:11:7] = False                                        # but not the four touching it diagonally
    assert torch.allclose(extra[edge], torch.tensor(8.0)) and not extra[~edge].any()   # frame 0 untouched
    assert torch.equal(train._latent_object_weight(x0, 0.0, outline=0.0), torch.ones_like(plain))
    assert torch.allclose(train._latent_object_weight(x0, 0.0, outline=8.0), 1 + extra)


def test_the_latent_warp_moves_layouts_but_keeps_flat_codes_and_frames_apart():
    gen = torch.Generator().manual_seed(0)
    z = torch.zeros(2, 3, 2, 8, 8)
    z[:, 0, 1, 3:5, 3:5] = 1.0                               # a 2x2-cell object in the second frame
    z[:, 1] = 4.0                                            # a flat code in another channel
    assert torch.allclose(train._warp_latent(z, torch.zeros(2), gen), z, atol=1e-5)
    moved = train._warp_latent(z, torch.tensor([0.0, 1.0]), gen)
    assert torch.allclose(moved[0], z[0], atol=1e-5) and not torch.allclose(moved[1], z[1], atol=1e-2)
    assert torch.allclose(moved[:, 1], torch.tensor(4.0)) and not moved[:, 0, 0].any()


def test_tuning_the_decoder_leaves_the_encoder_as_it_was_and_resumes_as_finished(tmp_path):
    vae = train.train_vae(tmp_path, train.SMOKE, 0, torch.device("cpu"), quiet)
    before = {k: v.clone() for k, v in vae.state_dict().items()}
    tuned = train.tune_decoder(tmp_path, vae, train.SMOKE, 0, torch.device("cpu"), quiet)
    after = tuned.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(("encoder.", "conv1.")))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("decoder."))
    assert (tmp_path / "decoder.done").exists()
    again = train.tune_decoder(tmp_path, train.train_vae(tmp_path, train.SMOKE, 0, torch.device("cpu"), quiet),
                               train.SMOKE, 0, torch.device("cpu"), None)      # finished: loads, no loop
    assert all(torch.equal(v, after[k]) for k, v in again.state_dict().items())


def test_a_work_folder_from_a_recipe_with_another_vae_shape_is_refused_with_what_to_do(tmp_path):
    """A VAE checkpoint saved by an earlier recipe (here: the exported config, where the stage now trains a narrower
    decoder) is not silently mixed in: the error names the file and says to use a new --work folder."""
    wide = train.WanVAE(train.VAE_CONFIG)
    torch.save({"model": wide.state_dict(), "step": 3}, tmp_path / "vae.pt")
    (tmp_path / "vae.done").write_text("earlier")
    with pytest.raises(RuntimeError, match=r"vae\.pt holds a WanVAE of another shape.*new --work folder"):
        train.train_vae(tmp_path, train.SMOKE, 0, torch.device("cpu"), quiet)


def test_the_wide_decoder_is_trained_on_the_frozen_encoder_and_resumes_as_finished(tmp_path):
    joint = train.train_vae(tmp_path, train.SMOKE, 0, torch.device("cpu"), quiet)
    assert joint.config.dec_dim == train.JOINT_DECODER_DIM < train.VAE_CONFIG.dec_dim
    encoder = {k: v.clone() for k, v in joint.state_dict().items() if k.startswith(("encoder.", "conv1."))}
    wide = train.train_wide_decoder(tmp_path, joint, train.SMOKE, 0, torch.device("cpu"), quiet)
    # The exported VAE's shape, the joint VAE's encoder untouched, a decoder of its own that trained.
    assert wide.config == train.VAE_CONFIG
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in encoder.items())
    fresh = torch.load(tmp_path / "wide-decoder.pt", weights_only=False)
    assert fresh["step"] == train.SMOKE.wide_decoder_steps and (tmp_path / "wide-decoder.done").exists()
    video = torch.zeros(1, 3, 5, 32, 32)
    assert wide.decode(wide.encode(video)).shape == video.shape
    torch.manual_seed(3)
    untrained = train.WanVAE(train.VAE_CONFIG).state_dict()
    assert any(not torch.equal(untrained[k], v) for k, v in wide.state_dict().items() if k.startswith("decoder."))
    again = train.train_wide_decoder(tmp_path, joint, train.SMOKE, 0, torch.device("cpu"), None)   # loads, no loop
    assert all(torch.equal(v, wide.state_dict()[k]) for k, v in again.state_dict().items())
    # Without wide-decoder steps the VAE stage trains the exported VAE itself.
    assert train.joint_vae_config(replace(train.SMOKE, wide_decoder_steps=0)) == train.VAE_CONFIG


def test_sharpened_samples_start_from_a_blurred_latent_and_still_aim_at_the_sharp_one():
    from types import SimpleNamespace
    x0 = torch.zeros(6, 16, 1, 8, 8)
    x0[:, :, :, 2:5, 3:6] = 2.0                                           # a sharp-edged object
    seen = {}

    def ideal(xt, t, context):                                            # the velocity whose clean estimate is x0
        seen["xt"] = xt
        s = (t[:, 0] / 1000).view(-1, 1, 1, 1, 1)
        return (xt - x0) / s
    class Stub:
        config = SimpleNamespace(patch_size=(1, 2, 2))
        __call__ = staticmethod(ideal)
    dit = Stub()
    encoder = lambda ids, mask: torch.zeros(*ids.shape, 8)
    tokenizer = lambda prompts, max_length: (torch.ones(len(prompts), 3, dtype=torch.long), torch.ones(len(prompts), 3))
    scenes = [world.sample_scene(np.random.default_rng(i), 1) for i in range(6)]

    def run(share):
        budget = replace(train.SMOKE, sharpen_share=share, uncond_share=0.0)
        loss = train._flow_loss(dit, encoder, tokenizer, x0, scenes, np.random.default_rng(0),
                                torch.Generator().manual_seed(3), budget, torch.device("cpu"), i2v=False)
        return loss, seen["xt"]
    plain_loss, plain_xt = run(0.0)
    sharp_loss, sharp_xt = run(1.0)
    assert plain_loss < 1e-6 and sharp_loss < 1e-6                       # both targets' clean estimate is x0
    sigma = train._draw_sigmas(torch.Generator().manual_seed(3), train.SMOKE.shift, 6)
    moved = (sharp_xt - plain_xt).flatten(1).abs().amax(1) > 1e-3
    assert moved.tolist() == (sigma >= train.SHARPEN_FROM).tolist() and moved.any()


@pytest.mark.skipif(not builtin.available(), reason="the shipped weights are not in pipeline/builtin")
def test_the_shipped_model_draws_what_fresh_prompts_ask(tmp_path):
    """The shipped weights at default settings, judged from pixels by the evaluator on 12 + 6 prompts drawn with a
    seed of their own (the README's table has the full report). The bounds sit well under what the shipped weights
    score here (all right 58%, motion 83%, image-to-video motion 100%), so that another CPU's rounding cannot flip
    them."""
    from zoetrope.pipeline.world import report
    d = builtin.DEFAULTS
    dit, vae, te = builtin.load(dtype=torch.float32)
    summary = report.run(dit, vae, te, single=12, two=0, i2v=6, seed=777, steps=d["steps"], cfg=d["cfg"],
                         high_noise_cfg=d["cfg_high"], shift=d["shift"], solver=d["solver"], out=tmp_path,
                         image_first=builtin.IMAGE_FIRST,
                         picture=builtin.PICTURE,
                         progress=lambda *_: None)["summary"]
    assert summary["single_background"] == 1 and summary["single_colour"] >= 0.75, summary
    assert summary["single_motion"] >= 0.6 and summary["i2v_motion"] >= 0.6, summary
    assert summary["single_all"] >= 0.25, summary
    assert (tmp_path / "contact_sheet.png").is_file()


def test_clause_targets_give_every_token_of_an_object_phrase_its_objects_attributes(tmp_path):
    from zoetrope.pipeline.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_bytes(train.train_tokenizer(tmp_path, 0, train.TEXT_CONFIG.vocab_size))
    prompts = ["a small red circle moving left and one big blue box drifting to the right over grey", ""]
    ids, mask = tokenizer(prompts, max_length=train.DIT_CONFIG.text_len)
    targets = train._clause_targets(tokenizer, prompts, mask)
    pieces = [tokenizer.processor.id_to_piece(int(i)) for i in ids[0, :int(mask[0].sum())]]
    labelled = {}
    for piece, target in zip(pieces, targets[0].tolist()):
        labelled.setdefault(tuple(target), []).append(piece.lstrip("\u2581"))
    red = (list(world.COLOURS).index("red"), world.SHAPES.index("circle"), list(world.SIZES).index("small"),
           list(world.MOTIONS).index("moving left"))
    blue = (list(world.COLOURS).index("blue"), world.SHAPES.index("square"), list(world.SIZES).index("large"),
            list(world.MOTIONS).index("moving right"))
    assert "".join(labelled[red]) == "asmallredcirclemovingleft"
    assert "".join(labelled[blue]) == "onebigblueboxdriftingtotheright"
    assert "".join(labelled[(-1,) * 4]) == "andovergrey</s>"
    assert (targets[1] == -1).all() and (targets[0, int(mask[0].sum()):] == -1).all()


def test_the_clause_probe_teaches_the_text_encoder_which_object_each_motion_belongs_to(tmp_path):
    """Trained by the probe's loss alone, the text encoder's token of each object's colour word comes to carry that
    object's motion, which is what lets the transformer give each of two objects its own motion."""
    from zoetrope.pipeline.text_encoder import UMT5Encoder
    from zoetrope.pipeline.tokenizer import Tokenizer
    tokenizer = Tokenizer.from_bytes(train.train_tokenizer(tmp_path, 0, train.TEXT_CONFIG.vocab_size))
    torch.manual_seed(0)
    encoder = UMT5Encoder(replace(train.TEXT_CONFIG, vocab_size=tokenizer.vocab_size))
    probe = train.ClauseProbe(train.TEXT_CONFIG.dim)
    opt = torch.optim.AdamW(list(encoder.parameters()) + list(probe.parameters()), lr=3e-3)

    def batch(rng, n):
        prompts = [world.paraphrase(world.sample_scene(rng, 2), rng) for _ in range(n)]
        ids, mask = tokenizer(prompts, max_length=train.DIT_CONFIG.text_len)
        return prompts, ids, mask, train._clause_targets(tokenizer, prompts, mask)

    def motion_read_at_colour_words(prompts, ids, mask, targets):
        with torch.no_grad():
            motion = probe.head(encoder(ids, mask)).split(train.CLAUSE_CLASSES, dim=-1)[3].argmax(-1)
        colour_ids = {tokenizer.processor.encode(c)[0] for c in world.COLOURS}
        at = torch.tensor([[int(i) in colour_ids for i in row] for row in ids]) & (targets[..., 0] >= 0)
        return (motion[at] == targets[..., 3][at]).float().mean().item()

    rng = np.random.default_rng(1)
    held_out = batch(np.random.default_rng(2), 200)
    before = motion_read_at_colour_words(*held_out)
    for _ in range(150):
        _, ids, mask, targets = batch(rng, 48)
        loss = probe.loss(encoder(ids, mask), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = motion_read_at_colour_words(*held_out)
    assert before < 0.5 and after > 0.95, (before, after)


def test_the_clause_probe_trains_with_the_transformer_resumes_and_stays_out_of_the_exported_files(tmp_path,
                                                                                                  monkeypatch):
    monkeypatch.setattr(train, "SMOKE", replace(train.SMOKE, clause_weight=0.5))
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--smoke", "--work", str(work), "--out", str(out), "--threads", "1", "--dit-steps", "4"]
    train.main(args + ["--only", "transformer-1"])
    first = torch.load(work / "transformer.pt", weights_only=False)["clause_probe"]
    assert train.main(args) == 0
    last = torch.load(work / "transformer.pt", weights_only=False)["clause_probe"]
    assert not torch.equal(first["head.weight"], last["head.weight"])      # resumed and trained on
    from safetensors.torch import load_file
    assert not any("head" in k for k in load_file(out / "zoetrope_builtin_text_encoder.safetensors"))
