"""Input pipelines: folders, numpy arrays, tensorflow-datasets and a built-in synthetic set.

Every source returns a `SegmentationData` of batched train/val/test `tf.data.Dataset`s
yielding (image float32 [B, H, W, C], mask int32 [B, H, W, 1]) tuples.

Modules, one concern each: the sources `folder` (over `pairing` and `inspection`), `arrays`,
`tfds_source`, `synthetic`; for scans (CT/MRI volumes) `volumes` (the `Volume` type, resampling,
intensity windows), `medical_io` (NIfTI and DICOM reading and writing, pairing), `synthetic_ct`,
`volume_pipeline` (3D patches or 2.5D slices, split by scan) and `augment3d`; per sample
`checks` (arguments), `masks` (values -> class ids), `readers` (file decoding), `crops`
(resize, normalize, crop); `pipeline` (splits, cache, shuffle, batches); `augment` (joint
augmentation); `stats`. `decode` re-exports the per-sample
helpers under their earlier import path.

Example:
    >>> data = unetpp_tf.data.synthetic(num_samples=256)
    >>> data = unetpp_tf.data.from_directory("my_data", image_size=(256, 256), group_by=r"^(slide[0-9]+)_")
    >>> scans = unetpp_tf.data.from_volumes("my_ct", mode="3d", patch_size=(32, 96, 96), window="lung")
"""

from unetpp_tf.data.arrays import from_arrays
from unetpp_tf.data.augment import AugmentedModel, SegmentationAugmenter
from unetpp_tf.data.augment3d import VolumeAugmenter
from unetpp_tf.data.folder import from_directory
from unetpp_tf.data.inspection import MAX_IMAGE_PIXELS
from unetpp_tf.data.medical_io import read_scan, read_scan_pair, scan_pairs, write_scan
from unetpp_tf.data.pipeline import (
    SPLITS,
    SegmentationData,
    advance_epochs,
    finalize,
    fold_indices,
    split_indices,
    targets_per_head,
)
from unetpp_tf.data.stats import dataset_statistics
from unetpp_tf.data.synthetic import synthetic, synthetic_sample
from unetpp_tf.data.synthetic_ct import synthetic_ct, write_synthetic_ct
from unetpp_tf.data.tfds_source import from_tfds
from unetpp_tf.data.volume_pipeline import from_volumes
from unetpp_tf.data.volumes import WINDOWS, Volume, apply_window, resample

__all__ = [
    "MAX_IMAGE_PIXELS",
    "SPLITS",
    "WINDOWS",
    "AugmentedModel",
    "SegmentationAugmenter",
    "SegmentationData",
    "Volume",
    "VolumeAugmenter",
    "advance_epochs",
    "apply_window",
    "dataset_statistics",
    "finalize",
    "fold_indices",
    "from_arrays",
    "from_directory",
    "from_tfds",
    "from_volumes",
    "read_scan",
    "read_scan_pair",
    "resample",
    "scan_pairs",
    "split_indices",
    "synthetic",
    "synthetic_ct",
    "synthetic_sample",
    "targets_per_head",
    "write_scan",
    "write_synthetic_ct",
]
