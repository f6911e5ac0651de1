"""Matplotlib figures: samples with mask overlays, augmentation previews, statistics.

Every function builds a `matplotlib.figure.Figure` without pyplot (safe on headless
machines and in notebooks), returns it, and saves a PNG when `path` is given (through
`unetpp_tf.files.atomic_write`: a kill never leaves a truncated figure).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from unetpp_tf import files

# Overlay colours for class ids 1, 2, ... (0 is background and stays transparent).
CLASS_COLORS = np.array(
    [[1.0, 0.2, 0.2], [0.2, 0.8, 1.0], [1.0, 0.85, 0.1], [0.6, 1.0, 0.3], [0.9, 0.4, 1.0], [1.0, 0.6, 0.2]]
)


def _as_rgb(image) -> np.ndarray:
    image = np.asarray(image, np.float32)
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:  # normalized input: stretch for display
        image = (image - low) / max(high - low, 1e-6)
    return np.repeat(image[..., None], 3, axis=-1) if image.ndim == 2 else image[..., :3]


def overlay(image, mask, alpha: float = 0.45) -> np.ndarray:
    """Blend a class-id mask over an image.

    Args:
        image: array [H, W] or [H, W, C]. Values in [0, 1] (others are stretched).
        mask: array [H, W] or [H, W, 1]. Class ids; 0 is not drawn.
        alpha: float. Opacity of the mask colours. Defaults to 0.45.

    Returns:
        ndarray: float RGB [H, W, 3] in [0, 1].

    Example:
        >>> rgb = overlay(image, mask)
    """
    rgb = _as_rgb(image)
    mask = np.asarray(mask).astype(np.int64)
    mask = mask[..., 0] if mask.ndim == 3 else mask
    colors = CLASS_COLORS[(np.maximum(mask, 1) - 1) % len(CLASS_COLORS)]
    weight = alpha * (mask > 0)[..., None]
    return rgb * (1 - weight) + colors * weight


def _save(fig: Figure, path) -> Figure:
    fig.tight_layout()
    if path is not None:
        suffix = Path(path).suffix.lstrip(".").lower()
        files.atomic_write(path, lambda temp: fig.savefig(temp, dpi=100, format=suffix or "png"))
    return fig


def _grid(rows: int, cols: int, cell: float = 2.0) -> tuple[Figure, np.ndarray]:
    fig = Figure(figsize=(cols * cell, rows * cell))
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.flat:
        ax.set_axis_off()
    return fig, axes


def plot_samples(dataset, num: int = 8, path=None, title: str | None = None) -> Figure:
    """Show `num` samples of a dataset: the image above, the mask overlay below.

    Args:
        dataset: iterable of (images, masks) batches, e.g. `data.train`.
        num: int. Samples to show. Defaults to 8.
        path: str or Path or None. Save the figure as PNG here. Defaults to None.
        title: str or None. Figure title. Defaults to None.

    Returns:
        Figure: the matplotlib figure.

    Example:
        >>> plot_samples(unetpp_tf.data.synthetic(64).train, num=6, path="samples.png")
    """
    images, masks = [], []
    for batch_images, batch_masks in dataset:
        images.extend(np.asarray(batch_images))
        masks.extend(np.asarray(batch_masks))
        if len(images) >= num:
            break
    if not images:
        raise ValueError("the dataset is empty: no sample to plot.")
    num = min(num, len(images))
    fig, axes = _grid(2, num)
    for k in range(num):
        axes[0, k].imshow(_as_rgb(images[k]))
        axes[1, k].imshow(overlay(images[k], masks[k]))
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_augmentation(image, mask, augmenter, draws: int = 8, path=None) -> Figure:
    """Preview augmentation: one sample, `draws` random draws, mask over image.

    Args:
        image: array [H, W, C]. One image.
        mask: array [H, W, 1] or [H, W]. Its mask.
        augmenter: callable. `augmenter(images, masks, training=True)`, e.g. a
            `SegmentationAugmenter`.
        draws: int. Number of random draws shown after the original. Defaults to 8.
        path: str or Path or None. Save the figure as PNG here. Defaults to None.

    Returns:
        Figure: the original first, then the draws (top: image, bottom: overlay).

    Example:
        >>> plot_augmentation(image, mask, SegmentationAugmenter(rotation=0.1, seed=0))
    """
    image = np.asarray(image, np.float32)
    mask = np.asarray(mask)
    batch_images = np.repeat(image[None], draws, axis=0)
    batch_masks = np.repeat(mask[None], draws, axis=0)
    out_images, out_masks = augmenter(batch_images, batch_masks, training=True)
    out_images, out_masks = np.asarray(out_images), np.asarray(out_masks)
    fig, axes = _grid(2, draws + 1)
    for k, (img, msk) in enumerate([(image, mask), *zip(out_images, out_masks)]):
        axes[0, k].imshow(_as_rgb(img))
        axes[1, k].imshow(overlay(img, msk))
        axes[0, k].set_title("original" if k == 0 else f"draw {k}", fontsize=8)
    return _save(fig, path)


def plot_statistics(stats: dict, path=None) -> Figure:
    """Draw the output of `dataset_statistics`: class pixel fractions and a summary.

    Args:
        stats: dict. From `unetpp_tf.data.dataset_statistics`.
        path: str or Path or None. Save the figure as PNG here. Defaults to None.

    Returns:
        Figure: a bar chart of class pixel fractions beside the key numbers.

    Example:
        >>> plot_statistics(dataset_statistics(data.train), path="stats.png")
    """
    fig = Figure(figsize=(8, 3))
    bars, text = fig.subplots(1, 2)
    fractions = stats["class_pixel_fraction"]
    bars.bar([str(c) for c in range(len(fractions))], fractions, color="tab:blue")
    bars.set_xlabel("class id")
    bars.set_ylabel("pixel fraction")
    bars.set_ylim(0, 1)
    text.set_axis_off()
    sizes = ", ".join(f"{size} ({n})" for size, n in stats["image_sizes"].items())
    lines = [
        f"images: {stats['count']}",
        f"sizes: {sizes}",
        f"channels: {stats['channels']}",
        f"empty masks: {stats['empty_mask_fraction']:.1%}",
        f"intensity: {stats['intensity_mean']:.3f} +/- {stats['intensity_std']:.3f}",
    ]
    text.text(0.0, 0.5, "\n".join(lines), va="center", family="monospace", fontsize=9)
    return _save(fig, path)


def plot_history(history: dict, path=None) -> Figure:
    """Plot training curves: losses in one panel, Dice/IoU-like scores in another.

    Args:
        history: dict. {name: [value per epoch]}, e.g. `keras.callbacks.History.history`
            or a run's history.csv read back.
        path: str or Path or None. Save the figure as PNG here. Defaults to None.

    Returns:
        Figure: two panels sharing the epoch axis.

    Example:
        >>> plot_history(model.fit(...).history, path="curves.png")
    """
    fig = Figure(figsize=(10, 3.5))
    loss_ax, score_ax = fig.subplots(1, 2)
    for name, values in history.items():
        if name in ("epoch", "learning_rate"):
            continue
        ax = loss_ax if "loss" in name else score_ax
        ax.plot(range(1, len(values) + 1), values, label=name, linestyle="--" if name.startswith("val_") else "-")
    for ax, label in ((loss_ax, "loss"), (score_ax, "score")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        if ax.lines:
            ax.legend(fontsize=7)
    return _save(fig, path)


def plot_predictions(images, masks, probabilities, num: int = 6, threshold: float = 0.5, path=None) -> Figure:
    """Compare predictions with the truth: image, true overlay, predicted overlay per column.

    Args:
        images: array [N, H, W, C].
        masks: array [N, H, W, 1] or [N, H, W]. True class ids.
        probabilities: array [N, H, W, K]. Model output (sigmoid for K = 1, else softmax).
        num: int. Columns to draw. Defaults to 6.
        threshold: float. Foreground threshold for K = 1. Defaults to 0.5.
        path: str or Path or None. Save the figure as PNG here. Defaults to None.

    Returns:
        Figure: three rows (image, truth, prediction).

    Example:
        >>> plot_predictions(x, y, model.predict(x), path="predictions.png")
    """
    images, probabilities = np.asarray(images), np.asarray(probabilities)
    if probabilities.shape[-1] == 1:
        labels = (probabilities[..., 0] >= threshold).astype(np.int64)
    else:
        labels = probabilities.argmax(-1)
    num = min(num, len(images))
    fig, axes = _grid(3, num)
    for k in range(num):
        axes[0, k].imshow(_as_rgb(images[k]))
        axes[1, k].imshow(overlay(images[k], np.asarray(masks)[k]))
        axes[2, k].imshow(overlay(images[k], labels[k]))
    for row, label in enumerate(("image", "truth", "prediction")):
        axes[row, 0].set_title(label, fontsize=8, loc="left")
    return _save(fig, path)


def plot_prune_report(report: dict, path=None) -> Figure:
    """Draw a prune report as the paper's speed/accuracy figure: Dice against cost, one point per level.

    Panels: Dice vs parameters, and, when the report was timed, Dice vs batch-1 latency (Keras
    and int8 TFLite). Points are labelled L1..Ld and "full" (the mean of the heads); the level
    a tolerance chose (`report["chosen"]`) is ringed.

    Args:
        report: dict. From `unetpp_tf.pruning_report.prune_report`.
        path: str or Path or None. Save the figure as PNG here. Defaults to None.

    Returns:
        Figure: one or two panels.

    Example:
        >>> plot_prune_report(prune_report(model, data.val), path="prune_report.png")
    """
    rows = report["rows"]
    timed = all(row.get("keras_ms") is not None for row in rows)
    fig = Figure(figsize=(10 if timed else 5, 3.8))
    axes = fig.subplots(1, 2 if timed else 1, squeeze=False)[0]
    panels = [(axes[0], [("parameters", "parameters", "tab:blue", 1e-6)], "parameters (M)")]
    if timed:
        series = [("keras_ms", "Keras", "tab:blue", 1.0)]
        if all(row.get("int8_ms") is not None for row in rows):
            series.append(("int8_ms", "int8 TFLite", "tab:orange", 1.0))
        panels.append((axes[1], series, "batch-1 latency (ms)"))
    dice = [row["dice"] for row in rows]
    for ax, series, label in panels:
        for key, name, color, scale in series:
            xs = [row[key] * scale for row in rows]
            levels = [k for k, row in enumerate(rows) if row.get("level") is not None]
            ax.plot([xs[k] for k in levels], [dice[k] for k in levels], "-o", color=color, label=name)
            full = [k for k in range(len(rows)) if k not in levels]
            ax.plot([xs[k] for k in full], [dice[k] for k in full], "s", color=color)
            for x, y, row in zip(xs, dice, rows):
                ax.annotate(row["name"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
                if report.get("chosen") is not None and row.get("level") == report["chosen"]:
                    ax.plot([x], [y], "o", markersize=14, markerfacecolor="none", markeredgecolor="tab:red")
        if series[0][0] == "parameters":  # each level has about 4x the parameters of the one before
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("Dice")
        if len(series) > 1:
            ax.legend(fontsize=7)
    size = "x".join(str(n) for n in report.get("image_size", []))
    fig.suptitle(f"pruning levels on {report.get('images')} validation images ({size})", fontsize=10)
    return _save(fig, path)
