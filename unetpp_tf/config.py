"""The training configuration: one dataclass, read from flags, JSON or YAML, saved with each run."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

CHOICES = {
    "arch": ("unetpp", "unet"),
    "upsampling": ("transpose", "bilinear", "nearest"),
    "loss": ("auto", "dice", "bce_dice", "ce_dice", "tversky", "focal"),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "cosine", "plateau"),
    "mixed_precision": ("none", "bf16", "fp16"),
    "strategy": ("auto", "one-device", "mirrored", "tpu"),
    "xla": ("auto", "on", "off"),
    "augment": ("device", "host", "none"),
    "task": ("binary", "multiclass"),
    "normalize": ("fixed", "dataset", "minmax", "percentile", "zscore"),
}

DEFAULT_AUGMENTATION = dict(flip=True, rotate90=True, brightness=0.1, contrast=0.1, noise=0.02)


@dataclasses.dataclass
class TrainConfig:
    """Everything `unetpp_tf.train` needs; the defaults train the built-in synthetic task.

    `data` is "synthetic" (the built-in nuclei set), a folder laid out as
    `from_directory` expects, or "tfds:NAME" (e.g. "tfds:oxford_iiit_pet"); `images` and
    `masks` name two explicit folders instead. The defaults (a 16-filter depth-4 UNet++,
    10 epochs of 512 synthetic 96x96 images in batches of 8) reach a test Dice above 0.9 in a
    few minutes on a 2-core CPU; the small-data recipe behind them is measured in
    `benchmarks/accuracy.py`. Deep supervision (`deep_supervision=True`) is opt-in: it is
    what inference-time pruning needs, and on short runs it costs accuracy (multi-class most).

    Example:
        >>> config = TrainConfig(name="nuclei", epochs=20, filters=32)
        >>> config = TrainConfig.from_dict(json.load(open("config.json")))
    """

    # run
    name: str | None = None
    output_dir: str = "saved_models"
    seed: int = 0
    # data
    data: str = "synthetic"
    images: str | None = None
    masks: str | None = None
    task: str = "binary"
    num_samples: int = 512
    image_size: tuple = (96, 96)
    crop_size: tuple | None = None
    channels: int | None = None
    num_classes: int | None = None
    batch_size: int = 8
    split: tuple = (0.7, 0.15, 0.15)
    group_by: str | None = None
    skip_invalid: bool = False
    folds: int = 0
    normalize: str = "dataset"
    augment: str = "device"
    augmentation: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_AUGMENTATION))
    # model
    arch: str = "unetpp"
    preset: str | None = None
    depth: int = 4
    filters: int | tuple = 16
    deep_supervision: bool = False
    batch_norm: bool = True
    bn_momentum: float = 0.9
    dropout: float = 0.0
    l2: float = 0.0
    upsampling: str = "transpose"
    # optimisation
    loss: str = "auto"
    optimizer: str = "adam"
    learning_rate: float = 3e-3
    weight_decay: float = 1e-4
    schedule: str = "cosine"
    warmup_steps: int = 50
    min_steps: int = 200
    clipnorm: float | None = None
    epochs: int = 10
    early_stopping: int = 0
    mixed_precision: str = "none"
    xla: str = "auto"
    recompute: bool = False
    strategy: str = "auto"
    # outputs
    export_saved_model: bool = True
    export_tflite: bool = True

    def __post_init__(self):
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}.")
        for key in ("image_size", "crop_size", "split"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, tuple(value))
        if isinstance(self.filters, list):
            self.filters = tuple(self.filters)
        for key in ("epochs", "batch_size", "num_samples"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}.")
        for key in ("warmup_steps", "min_steps", "folds"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{key} must be an integer >= 0, got {value!r}.")
        if self.folds == 1:
            raise ValueError("folds must be 0 (no cross-validation) or at least 2, got 1.")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}.")
        if self.learning_rate <= 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate}.")
        if self.arch == "unet" and self.deep_supervision:
            self.deep_supervision = False  # U-Net has a single decoder column

    def to_dict(self) -> dict:
        """Return a JSON-ready dict (tuples become lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, values: dict, source: str = "config") -> TrainConfig:
        """Build from a dict of settings; unknown keys raise one error naming them and close matches.

        Args:
            values: dict. Setting names (the field names) and values.
            source: str. Where the values came from, for the error (e.g. a file name).
                Defaults to "config".

        Example:
            >>> TrainConfig.from_dict({"epochs": 3, "filters": 8}, source="train.yaml")
        """
        known = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(values) - set(known), key=str)
        if unknown:
            hints = []
            for key in unknown:
                close = difflib.get_close_matches(str(key), known, n=1)
                hints.append(f"{key!r} (did you mean {close[0]!r}?)" if close else repr(key))
            raise ValueError(
                f"{source}: unknown setting(s) {', '.join(hints)}; valid settings are {', '.join(sorted(known))}."
            )
        return cls(**values)


def load_config(path) -> dict:
    """Read a JSON or YAML (.yaml/.yml, needs PyYAML) configuration file into a dict.

    Args:
        path: str or Path. The file.

    Returns:
        dict: the key/value pairs, to merge into a `TrainConfig`.

    Example:
        >>> TrainConfig.from_dict(load_config("train.yaml"))
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist.")
    is_yaml = path.suffix.lower() in (".yaml", ".yml")
    if is_yaml:
        try:
            import yaml
        except ImportError as error:
            raise ValueError(f"{path}: reading YAML needs PyYAML: pip install 'unetpp-tf[yaml]'.") from error
    try:
        values = yaml.safe_load(path.read_text()) if is_yaml else json.loads(path.read_text())
    except Exception as error:  # json.JSONDecodeError or yaml.YAMLError
        raise ValueError(f"{path} is not valid {'YAML' if is_yaml else 'JSON'}: {error}") from error
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a mapping of settings, got {type(values).__name__}.")
    return values
