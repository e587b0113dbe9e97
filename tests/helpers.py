"""Builders shared by the test modules: padded random captions, backbones with non-trivial
BatchNorm statistics, a short training loop that records the loss, and a tap on rsitr's log."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator

import torch
from torch import nn


def random_tokens(n: int, vocab: int, min_length: int, max_length: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` captions of token ids in ``[1, vocab)`` with lengths uniform in ``[min_length, max_length]``.

    Returns ``(tokens, lengths)``; ``tokens`` is as wide as the longest caption, padded with 0.
    """
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_length, max_length + 1, (n,), generator=g)
    tokens = torch.randint(1, vocab, (n, int(lengths.max())), generator=g)
    tokens[torch.arange(tokens.shape[1])[None, :] >= lengths[:, None]] = 0
    return tokens, lengths


def randomise_batchnorm_statistics(model: nn.Module, generator: torch.Generator) -> nn.Module:
    """Give every BatchNorm running mean and variance random values, so that a lost buffer shows."""
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.copy_(torch.randn(buf.shape, generator=generator) * 0.1)
            elif name.endswith("running_var"):
                buf.copy_(torch.rand(buf.shape, generator=generator) + 0.5)
    return model


def same_levels(a: nn.Module, b: nn.Module, side: int = 64) -> bool:
    """Whether two backbones in eval mode give bit-identical ``forward_levels`` on one random batch."""
    x = torch.randn(2, 3, side, side, generator=torch.Generator().manual_seed(3))
    with torch.inference_mode():
        return all(torch.equal(p, q) for p, q in zip(a.eval().forward_levels(x), b.eval().forward_levels(x), strict=True))


def loss_curve(model: nn.Module, features: dict[str, torch.Tensor], tokens: torch.Tensor, lengths: torch.Tensor,
               image_ids: torch.Tensor, lr: float, steps: int = 30,
               after_first_backward: Callable[[nn.Module], None] | None = None,
               **extras: torch.Tensor) -> list[float]:
    """Adam steps on one fixed batch; the loss of each step (each checked to be a finite scalar).

    ``after_first_backward(model)`` runs once, after the first backward pass and before the
    first update, for checks on the first gradients.
    """
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        loss = model.training_loss(features, tokens, lengths, image_ids, **extras)["loss"]
        assert loss.ndim == 0 and torch.isfinite(loss), f"step {step}: loss {loss}"
        optimizer.zero_grad()
        loss.backward()
        if step == 0 and after_first_backward is not None:
            after_first_backward(model)
        optimizer.step()
        losses.append(loss.item())
    return losses


class _CallbackHandler(logging.Handler):
    def __init__(self, callback: Callable[[str], None]) -> None:
        super().__init__(logging.INFO)
        self.callback = callback

    def emit(self, record: logging.LogRecord) -> None:  # exceptions raised by the callback propagate
        self.callback(record.getMessage())


@contextlib.contextmanager
def log_lines(callback: Callable[[str], None]) -> Iterator[None]:
    """Pass every message rsitr logs at INFO or above to ``callback`` while the block runs."""
    logger = logging.getLogger("rsitr")
    handler, level = _CallbackHandler(callback), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


SEARCH_WORDS = ("a", "the", "of", "with", "many", "some", "green", "trees", "buildings", "road", "river", "water",
                "field", "houses", "parking", "lot", "cars", "near", "beside", "large", "small", "bare", "land")


def random_bundle(out, model: str = "dove-s", seed: int = 0, image_size: int = 64, backbone: str | None = None, **params):
    """A model bundle with seeded random weights (no training), saved to ``out``; returns the bundle.

    Enough for the serving path: every tile and query encodes deterministically, and identical
    pixels give identical encodings.
    """
    from rsitr.bundle import RetrievalBundle
    from rsitr.features import FeatureSpec, feature_dims, load_backbone
    from rsitr.models import create_model, get_model_spec
    from rsitr.text import Vocabulary

    params = {"embed_dim": 32, "word_dim": 16, **params}
    import dataclasses

    spec = get_model_spec(model).with_overrides(params)
    if backbone is not None:
        spec = dataclasses.replace(spec, backbone=backbone)
    features = FeatureSpec(backbone=spec.backbone, image_size=image_size, precision="fp32", seed=seed)
    vocab = Vocabulary(list(SEARCH_WORDS))
    torch.manual_seed(seed)
    network = create_model(spec, feature_dims=feature_dims(features), vocab_size=len(vocab)).eval()
    bundle = RetrievalBundle(model=network, backbone=load_backbone(features), vocab=vocab, spec=spec,
                             feature_spec=features, info={"source": "random weights for tests"})
    bundle.save(out)
    return bundle


def texture(height: int, width: int, seed: int, channels: int = 3, dtype=None):
    """Seeded blocky noise (channels, height, width), uint8 (or uint16 values 500..): every tile of it differs."""
    import numpy as np

    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(channels, height // 8 + 1, width // 8 + 1))
    image = np.repeat(np.repeat(coarse, 8, axis=1), 8, axis=2)[:, :height, :width]
    if dtype == np.uint16:
        return (image.astype(np.uint16) * 40 + 500).astype(np.uint16)
    return image.astype(np.uint8)


def write_geotiff(path, data, crs="EPSG:32633", origin=(500_000.0, 5_000_000.0), pixel: float = 0.5):
    """A GeoTIFF of (bands, height, width) ``data`` with a CRS and a north-up transform (``crs=None``: a plain TIFF)."""
    import rasterio
    from rasterio.transform import from_origin

    bands, height, width = data.shape
    profile = {"driver": "GTiff", "width": width, "height": height, "count": bands, "dtype": data.dtype.name}
    if crs is not None:
        profile.update(crs=crs, transform=from_origin(origin[0], origin[1], pixel, pixel))
    with rasterio.open(path, "w", **profile) as out:
        out.write(data)
    return path
