"""Pictures people would rather look at than read: training curves and ablation sweeps."""

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


def _save_png(fig, path: str | Path) -> None:
    """Lay out, write atomically as PNG, and release the figure."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
