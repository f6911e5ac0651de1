"""The per-sample helpers under their earlier import path, `unetpp_tf.data.decode`.

Each name lives in the module of its concern; this module only re-exports them so that code
written as `from unetpp_tf.data.decode import check_size` keeps working. New code imports from
the modules themselves:

- `unetpp_tf.data.checks`: argument checks (`check_size`, `resolve_normalization`, `describe`);
- `unetpp_tf.data.masks`: mask values -> class ids (`plan_mask_mapping`, `lookup_values`, ...);
- `unetpp_tf.data.readers`: file decoding (`IMAGE_EXTENSIONS`, `pil_image_array`, `decode_image_file`);
- `unetpp_tf.data.crops`: resize, normalize and crop a sample (`preprocess_pair`, ...);
- `unetpp_tf.data.pipeline`: per-split crops, cache and batches (`batch_splits`, `split_cache`).

Example:
    >>> from unetpp_tf.data.decode import check_size  # same object as unetpp_tf.data.checks.check_size
"""

from unetpp_tf.data.checks import check_normalization_channels, check_size, describe, resolve_normalization
from unetpp_tf.data.crops import center_crop_pair, preprocess_pair, random_crop_pair
from unetpp_tf.data.masks import (
    MASK_MODES,
    MaskMapping,
    apply_mask_mapping,
    check_class_range,
    check_color_map,
    check_mask_mode,
    check_num_classes,
    classes_from_max_id,
    color_code,
    invalid_values,
    lookup_values,
    mask_values,
    max_class_id,
    plan_mask_mapping,
    rgb_to_classes,
)
from unetpp_tf.data.pipeline import batch_splits, split_cache
from unetpp_tf.data.readers import (
    COLOR_MODES,
    GRAY_MODES,
    IMAGE_EXTENSIONS,
    SIXTEEN_BIT_MODES,
    decode_image_file,
    decode_mask_file,
    pil_image_array,
    pil_mask_array,
    rgb_to_luminance,
    scale_to_unit,
)

__all__ = [
    "COLOR_MODES",
    "GRAY_MODES",
    "IMAGE_EXTENSIONS",
    "MASK_MODES",
    "SIXTEEN_BIT_MODES",
    "MaskMapping",
    "apply_mask_mapping",
    "batch_splits",
    "center_crop_pair",
    "check_class_range",
    "check_color_map",
    "check_mask_mode",
    "check_normalization_channels",
    "check_num_classes",
    "check_size",
    "classes_from_max_id",
    "color_code",
    "decode_image_file",
    "decode_mask_file",
    "describe",
    "invalid_values",
    "lookup_values",
    "mask_values",
    "max_class_id",
    "pil_image_array",
    "pil_mask_array",
    "plan_mask_mapping",
    "preprocess_pair",
    "random_crop_pair",
    "resolve_normalization",
    "rgb_to_classes",
    "rgb_to_luminance",
    "scale_to_unit",
    "split_cache",
]
