"""Figures: overlays, sample grids, augmentation previews and statistics, saved as PNG."""

import numpy as np
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
    fig = viz.plot_augmentation(image, mask, SegmentationAugmenter(rotation=0.1, seed=0), draws=3, path=tmp_path / "aug.png")
    assert len(fig.axes) == 8
    stats = unetpp_tf.data.dataset_statistics(data.train)
    fig = viz.plot_statistics(stats, path=tmp_path / "stats.png")
    assert len(fig.axes) == 2
    for name in ("samples.png", "aug.png", "stats.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
