"""Named configurations, starting with the paper's official one."""

from __future__ import annotations

import inspect

import keras

from unetpp_tf.models.deeplab import build_deeplabv3plus
from unetpp_tf.models.unetpp import build_unet, build_unetpp

ARCHITECTURES = {"unetpp": build_unetpp, "unet": build_unet, "deeplabv3plus": build_deeplabv3plus}

PRESETS = {
    # The official Keras code of Zhou et al.: 32..512 filters, two 3x3 ReLU convs per
    # node, he_normal, L2 1e-4, dropout 0.5, no BatchNorm, 2x2 stride-2 transposed conv.
    "paper": dict(
        depth=4,
        filters=(32, 64, 128, 256, 512),
        batch_norm=False,
        dropout=0.5,
        l2=1e-4,
        upsampling="transpose",
        activation="relu",
        kernel_initializer="he_normal",
    ),
}


def build_model(arch: str = "unetpp", **options) -> keras.Model:
    """Build a model by architecture name ("unetpp", "unet" or "deeplabv3plus").

    Args:
        arch: str. A key of `ARCHITECTURES`. Defaults to "unetpp".
        **options: arguments of `build_unetpp` / `build_unet` / `build_deeplabv3plus`.

    Example:
        >>> model = build_model("unet", input_shape=(64, 64, 3), filters=16)
        >>> deeplab = build_model("deeplabv3plus", input_shape=(64, 64, 3), encoder="mobilenetv2")
    """
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}.")
    builder = ARCHITECTURES[arch]
    try:
        inspect.signature(builder).bind(**options)
    except TypeError:
        valid = [key for key, p in inspect.signature(builder).parameters.items() if p.kind is not p.VAR_KEYWORD]
        unknown = sorted(set(options) - set(valid))
        raise ValueError(f"unknown option(s) {unknown} for arch {arch!r}; valid options are {valid}.") from None
    return builder(**options)


def from_preset(preset: str = "paper", arch: str = "unetpp", **overrides) -> keras.Model:
    """Build a named configuration; keyword arguments override the preset's values.

    The "paper" preset with a 1-channel input has exactly 9,041,601 parameters as UNet++
    (9,041,700 with the four deep-supervision heads) and 7,759,521 as U-Net; with a
    (D, H, W, 1) volume input (3x3x3 convolutions, 2x2x2 transposed) 26,198,273 and 22,575,329.

    Args:
        preset: str. A key of `PRESETS`. Defaults to "paper".
        arch: str. "unetpp" or "unet". Defaults to "unetpp".
        **overrides: any argument of the builder (input_shape, num_classes, ...).

    Example:
        >>> model = from_preset("paper", input_shape=(96, 96, 1), deep_supervision=True)
        >>> model.count_params()
        9041700
    """
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}.")
    return build_model(arch, **{**PRESETS[preset], **overrides})
