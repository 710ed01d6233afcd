"""Shared fixtures: the built-in model's files (the shipped ones, or random-weight stand-ins of the same configs)."""
from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def builtin_model_dir(tmp_path_factory):
    """The folder holding the built-in model's three files: pipeline/builtin when they exist, else random-weight
    files of the same architectures, exported the way training exports them (so the tests run before training)."""
    from zoetrope.pipeline import builtin
    if builtin.available():
        return builtin.FOLDER
    import torch
    from zoetrope.pipeline.dit import WanModel
    from zoetrope.pipeline.text_encoder import TextEncoder, UMT5Encoder
    from zoetrope.pipeline.tokenizer import Tokenizer
    from zoetrope.pipeline.vae import WanVAE
    from zoetrope.pipeline.world import train

    out = tmp_path_factory.mktemp("builtin")
    torch.manual_seed(0)
    spiece = train.train_tokenizer(out, 0, train.TEXT_CONFIG.vocab_size)
    vae = WanVAE(train.VAE_CONFIG)
    dit = WanModel(train.DIT_CONFIG)
    te = TextEncoder(UMT5Encoder(train.TEXT_CONFIG), Tokenizer.from_bytes(spiece))
    z = train.VAE_CONFIG.z_dim
    # Latent statistics that are not the identity, so a missing (de)normalisation shows.
    stats = ([0.1 * (i % 5) - 0.2 for i in range(z)], [0.5 + 0.1 * (i % 7) for i in range(z)])
    train.export(out, vae, stats, dit, te, train.TEXT_CONFIG, spiece)
    return out


@pytest.fixture
def builtin_model(builtin_model_dir, monkeypatch):
    """Point the 'builtin' choice of the loaders at builtin_model_dir for one test."""
    from zoetrope.pipeline import builtin
    for name in ("TRANSFORMER", "VAE", "TEXT_ENCODER"):
        monkeypatch.setattr(builtin, name, builtin_model_dir / getattr(builtin, name).name)
    monkeypatch.setattr(builtin, "FOLDER", builtin_model_dir)
    return builtin_model_dir
