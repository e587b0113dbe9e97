"""Pictures people would rather look at than read: training curves, ablation sweeps, AMFMN's salient masks."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rsitr.io import atomic_path


def plot_training_curves(history: list[dict], path: str | Path) -> None:
    """Loss terms and validation mR / R@1 per epoch, side by side, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = {"loss": "total", "final": "final pair (V_MR, T_RG)", "global": "global constraint (V_M, T_G)"}
    loss_keys = [k for k in history[0] if k not in ("epoch", "lr", "train_seconds") and not k.startswith("val_")]
    for key in loss_keys:
        ax_loss.plot(epochs, [row[key] for row in history], marker="o", ms=3, label=labels.get(key, key))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    for key, label in (("val_mR", "mR"), ("val_i2t_r1", "i2t R@1"), ("val_t2i_r1", "t2i R@1")):
        if key in history[0]:
            ax_val.plot(epochs, [row[key] for row in history], marker="o", ms=3, label=label)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation (%)")
    ax_val.legend()
    _save_png(fig, path)


def plot_sweep(table: dict[str, dict], values: list[float], parameter: str, path: str | Path, log_x: bool = False) -> None:
    """Recalls and mR against a swept parameter (DOVE Fig. 6 layout), error bars over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(table.values())
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, direction, name in ((axes[0], "i2t", "sentence retrieval (i2t)"), (axes[1], "t2i", "image retrieval (t2i)")):
        for k in (1, 5, 10):
            key = f"{direction}_r{k}"
            ax.errorbar(values, [r["mean"][key] for r in rows], yerr=[r["std"][key] for r in rows],
                        marker="o", ms=4, capsize=3, label=f"R@{k}")
        ax.set_title(name)
    axes[2].errorbar(values, [r["mean"]["mR"] for r in rows], yerr=[r["std"]["mR"] for r in rows],
                     marker="o", ms=4, capsize=3, color="black", label="mR")
    axes[2].set_title("mR")
    for ax in axes:
        ax.set_xlabel(parameter)
        ax.set_ylabel("%")
        if log_x:
            ax.set_xscale("log")
        ax.legend()
    _save_png(fig, path)


def _save_png(fig: Any, path: str | Path, dpi: int = 110) -> None:
    """Lay out, write atomically as PNG, and release the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    plt.close(fig)


def plot_pretrain_curves(history: list[dict[str, Any]], path: str | Path) -> None:
    """Training/validation loss and top-1 accuracy per epoch, side by side, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.6))
    for ax, key, label in ((ax_loss, "loss", "cross-entropy"), (ax_acc, "acc", "top-1 accuracy")):
        for split in ("train", "val"):
            values = [row.get(f"{split}_{key}") for row in history]
            if all(v is not None for v in values):
                ax.plot(epochs, values, marker="o", ms=3, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
    _save_png(fig, path)


def plot_salient_masks(images: Sequence[np.ndarray], masks: np.ndarray | torch.Tensor, path: str | Path,
                       titles: Sequence[str] | None = None, normalize: bool = True) -> Path:
    """Fig. 10 layout: per image a column with the image, its salient mask, and the mask over the image.

    Args:
        images: H × W × 3 uint8 arrays (any sizes).
        masks: (n, h, w) masks, e.g. :meth:`rsitr.models.amfmn.AMFMN.salient_mask`; drawn stretched over each image.
        path: the PNG to write (atomically: a temporary file in the same folder, then renamed).
        titles: optional caption above each column.
        normalize: stretch every mask to its own min–max range for display (sigmoid gates of a
            trained model often span a narrow band).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    masks = masks.detach().cpu().numpy() if isinstance(masks, torch.Tensor) else np.asarray(masks)
    if len(images) != len(masks) or len(images) == 0:
        raise ValueError(f"need one mask per image and at least one image, got {len(images)} images and {len(masks)} masks")
    fig, axes = plt.subplots(3, len(images), figsize=(2.4 * len(images), 7.2), squeeze=False)
    for column, (image, mask) in enumerate(zip(images, masks, strict=True)):
        mask = mask.astype(np.float64)
        if normalize:
            mask = (mask - mask.min()) / max(float(np.ptp(mask)), 1e-12)
        height, width = image.shape[:2]
        extent = (0, width, height, 0)
        axes[0, column].imshow(image)
        axes[1, column].imshow(mask, cmap="jet", vmin=0, vmax=1, extent=extent, interpolation="bilinear")
        axes[2, column].imshow(image)
        axes[2, column].imshow(mask, cmap="jet", vmin=0, vmax=1, alpha=0.45, extent=extent, interpolation="bilinear")
        if titles is not None:
            axes[0, column].set_title(str(titles[column]), fontsize=8)
        for row in range(3):
            axes[row, column].set_axis_off()
    for row, label in enumerate(("image", "salient mask", "overlay")):
        axes[row, 0].text(-0.05, 0.5, label, transform=axes[row, 0].transAxes, rotation=90, ha="right", va="center")
    _save_png(fig, path, dpi=100)
    return Path(path)
