"""Figures: overlays, sample grids, augmentation previews and statistics, saved as PNG."""

import numpy as np
import pytest
from matplotlib.figure import Figure

import unetpp_tf
from unetpp_tf import viz
from unetpp_tf.data import SegmentationAugmenter


def test_overlay_colours_only_labelled_pixels():
    image = np.full((4, 4, 1), 0.5, np.float32)
    mask = np.zeros((4, 4, 1), np.int32)
    mask[0, 0], mask[1, 1] = 1, 2
    rgb = viz.overlay(image, mask, alpha=0.5)
    assert rgb.shape == (4, 4, 3)
    np.testing.assert_allclose(rgb[3, 3], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(rgb[0, 0], 0.5 * 0.5 + 0.5 * viz.CLASS_COLORS[0])
    assert not np.allclose(rgb[0, 0], rgb[1, 1])


def test_figures_return_and_save(tmp_path):
    data = unetpp_tf.data.synthetic(16, image_size=(32, 32), batch_size=4)
    fig = viz.plot_samples(data.train, num=5, path=tmp_path / "samples.png", title="train")
    assert isinstance(fig, Figure) and len(fig.axes) == 10
    image, mask = (t.numpy() for t in unetpp_tf.data.synthetic_sample(0, image_size=(32, 32)))
    augmenter = SegmentationAugmenter(rotation=0.1, seed=0)
    fig = viz.plot_augmentation(image, mask, augmenter, draws=3, path=tmp_path / "aug.png")
    assert len(fig.axes) == 8
    stats = unetpp_tf.data.dataset_statistics(data.train)
    fig = viz.plot_statistics(stats, path=tmp_path / "stats.png")
    assert len(fig.axes) == 2
    for name in ("samples.png", "aug.png", "stats.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"


def test_history_and_prediction_figures(tmp_path):
    history = {"loss": [1.0, 0.5], "val_loss": [1.1, 0.6], "dice": [0.3, 0.7], "val_dice": [0.2, 0.6]}
    fig = viz.plot_history(history, path=tmp_path / "curves.png")
    loss_ax, score_ax = fig.axes
    assert {line.get_label() for line in loss_ax.lines} == {"loss", "val_loss"}
    assert {line.get_label() for line in score_ax.lines} == {"dice", "val_dice"}
    images = np.random.default_rng(0).random((3, 8, 8, 1))
    masks = (images > 0.5).astype(np.int32)
    fig = viz.plot_predictions(images, masks, images, num=3, path=tmp_path / "pred.png")
    assert len(fig.axes) == 9
    # The prediction row shows the thresholded probabilities: here equal to the truth.
    np.testing.assert_allclose(fig.axes[5].images[0].get_array(), fig.axes[8].images[0].get_array())
    assert (tmp_path / "pred.png").stat().st_size > 0


def test_a_failed_save_keeps_the_previous_figure(tmp_path, monkeypatch):
    history = {"loss": [1.0, 0.5]}
    path = tmp_path / "curves.png"
    viz.plot_history(history, path=path)
    before = path.read_bytes()

    def killed_midway(self, target, **kwargs):
        with open(target, "wb") as handle:
            handle.write(before[:100])  # a truncated PNG under the name it was given
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        viz.plot_history({"loss": [2.0, 0.1]}, path=path)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["curves.png"]
