"""The README's "Adding a model" example is real code: it registers, builds and learns."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import torch

from rsitr.models import create_model

README = Path(__file__).resolve().parents[1] / "README.md"


def _blocks(language: str) -> list[str]:
    section = README.read_text(encoding="utf-8").split("## Adding a model", 1)[1].split("\n## ", 1)[0]
    return re.findall(rf"```{language}\n(.*?)```", section, flags=re.DOTALL)


def test_readme_model_example_trains(tmp_path) -> None:
    (python_code,) = _blocks("python")
    (yaml_text,) = _blocks("yaml")
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    try:
        exec(compile(python_code, "README example", "exec"), module.__dict__)  # registers "mean-words"
    finally:
        del sys.modules[module.__name__]
    config = tmp_path / "mean-words.yaml"
    config.write_text(yaml_text)
    dims = {"level_channels": (8, 16, 32, 64), "region_channels": 32, "num_regions": 4, "maps": {}}
    torch.manual_seed(0)
    model = create_model(str(config), dims, vocab_size=30, embed_dim=16, word_dim=8)
    features = {"level4": torch.randn(6, 64)}
    tokens = torch.randint(1, 30, (6, 5))
    lengths = torch.tensor([5, 4, 3, 5, 2, 4])
    image_ids = torch.arange(6)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(40):
        loss = model.training_loss(features, tokens, lengths, image_ids)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert model.similarity(model.encode_image(features), model.encode_text(tokens, lengths)).shape == (6, 6)
