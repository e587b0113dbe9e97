"""Pictures people would rather look at than read: training curves."""

from __future__ import annotations

from pathlib import Path

from rsitr.io import atomic_path


def plot_training_curves(history: list[dict], path: str | Path) -> None:
    """Loss terms and validation mR / R@1 per epoch, side by side, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(10, 3.6))
    labels = {"loss": "total", "final": "final pair (V_MR, T_RG)", "global": "global constraint (V_M, T_G)"}
    for key, label in labels.items():
        if key in history[0]:
            ax_loss.plot(epochs, [row[key] for row in history], marker="o", ms=3, label=label)
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("training loss")
    ax_loss.legend()
    for key, label in (("val_mR", "mR"), ("val_i2t_r1", "i2t R@1"), ("val_t2i_r1", "t2i R@1")):
        if key in history[0]:
            ax_val.plot(epochs, [row[key] for row in history], marker="o", ms=3, label=label)
    ax_val.set_xlabel("epoch")
    ax_val.set_ylabel("validation (%)")
    ax_val.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
