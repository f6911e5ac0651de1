"""The training configuration: one dataclass, read from flags, JSON or YAML, saved with each run."""

from __future__ import annotations

import dataclasses
import difflib
import json
from pathlib import Path

CHOICES = {
    "arch": ("unetpp", "unet", "deeplabv3plus"),
    "upsampling": ("transpose", "bilinear", "nearest"),
    "loss": ("auto", "dice", "bce_dice", "ce_dice", "tversky", "focal"),
    "optimizer": ("adam", "adamw", "sgd"),
    "schedule": ("constant", "cosine", "plateau"),
    "mixed_precision": ("none", "bf16", "fp16"),
    "strategy": ("auto", "one-device", "mirrored", "tpu", "multi-worker"),
    "xla": ("auto", "on", "off"),
    "augment": ("device", "host", "none"),
    "task": ("binary", "multiclass"),
    "normalize": ("fixed", "dataset", "minmax", "percentile", "zscore"),
    "volume_mode": ("3d", "2.5d", "2d"),
    "postprocess": ("none", "auto"),
}

SYNTHETIC_CT = "synthetic-ct"

# The settings whose default depends on the data: None in a TrainConfig means "the recipe's value".
# Scans train on patches (3d) or on slices with their neighbours as channels (2.5d, 2d = one slice);
# `benchmarks/ct_recipe.py` measures the volume recipes.
IMAGE_RECIPE = dict(
    batch_size=8, epochs=10, num_samples=512, image_size=(96, 96), depth=4, filters=16, patches_per_volume=8,
    foreground_share=0.33,
)
VOLUME_RECIPES = {
    "3d": dict(batch_size=2, epochs=24, num_samples=16, patch_size=(32, 64, 64), depth=3, filters=8,
               patches_per_volume=8, foreground_share=0.5),
    "2.5d": dict(batch_size=8, epochs=24, num_samples=16, patch_size=(96, 96), depth=4, filters=16,
                 patches_per_volume=32, foreground_share=0.33),
    "2d": dict(batch_size=8, epochs=24, num_samples=16, patch_size=(96, 96), depth=4, filters=16,
               patches_per_volume=32, foreground_share=0.33),
}

DEEPLAB_OUTPUT_STRIDE = 16  # DeepLabV3+'s deepest map is at 1/16 of the input (build_deeplabv3plus's default)

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

    `encoder` puts the decoder on a `keras.applications` backbone (a name from
    `unetpp_tf.models.ENCODERS`; `depth` <= 4 decoder levels), `encoder_weights` starts it from
    "imagenet" or a weights file (None: random initialization), and `freeze_encoder_epochs` = N
    trains epochs 1..N with the encoder frozen, then all layers at `finetune_lr_factor` times
    the learning rate. `arch="deeplabv3plus"` builds DeepLabV3+ (encoder "resnet50" unless
    `encoder` names another); `dropout` None means each architecture's own default.

    Example:
        >>> config = TrainConfig(name="nuclei", epochs=20, filters=32)
        >>> config = TrainConfig(encoder="mobilenetv2", encoder_weights="imagenet", freeze_encoder_epochs=3)
        >>> config = TrainConfig.from_dict(json.load(open("config.json")))
        >>> config = TrainConfig(data="synthetic-ct", volume_mode="2.5d", window="lung")
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
    num_samples: int | None = None
    image_size: tuple | None = None
    crop_size: tuple | None = None
    channels: int | None = None
    num_classes: int | None = None
    batch_size: int | None = None
    split: tuple = (0.7, 0.15, 0.15)
    group_by: str | None = None
    skip_invalid: bool = False
    folds: int = 0
    normalize: str = "dataset"
    augment: str = "device"
    augmentation: dict = dataclasses.field(default_factory=lambda: dict(DEFAULT_AUGMENTATION))
    # scans
    volume_mode: str = "3d"
    patch_size: tuple | None = None
    slices: int = 5
    spacing: tuple | None = None
    window: str | tuple = "lung"
    foreground_share: float | None = None
    patches_per_volume: int | None = None
    # model
    arch: str = "unetpp"
    encoder: str | None = None
    encoder_weights: str | None = None
    preset: str | None = None
    depth: int | None = None
    filters: int | tuple | None = None
    deep_supervision: bool = False
    batch_norm: bool = True
    bn_momentum: float = 0.9
    dropout: float | None = None
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
    epochs: int | None = None
    freeze_encoder_epochs: int = 0
    finetune_lr_factor: float = 0.1
    early_stopping: int = 0
    mixed_precision: str = "none"
    xla: str = "auto"
    recompute: bool = False
    strategy: str = "auto"
    # multi-worker: the cluster (None = JAX_* variables, or JAX's own SLURM / Open MPI detection)
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    init_timeout: float = 300.0
    # outputs
    export_saved_model: bool = True
    export_tflite: bool = True
    export_onnx: bool = False
    postprocess: str = "none"

    def __post_init__(self):
        for key, choices in CHOICES.items():
            value = getattr(self, key)
            if value not in choices:
                raise ValueError(f"{key} must be one of {', '.join(choices)}; got {value!r}.")
        for key in ("image_size", "crop_size", "split", "patch_size", "spacing"):
            value = getattr(self, key)
            if value is not None:
                setattr(self, key, tuple(value))
        if isinstance(self.filters, list):
            self.filters = tuple(self.filters)
        if isinstance(self.window, list):
            self.window = tuple(self.window)
        self._fill_recipe()
        for key in ("epochs", "batch_size", "num_samples", "slices", "patches_per_volume", "depth"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}.")
        for key in ("warmup_steps", "min_steps", "folds", "freeze_encoder_epochs"):
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
        self._check_model()
        self._check_volume_settings()

    @property
    def on_scans(self) -> bool:
        """Whether the data are scans (NIfTI/DICOM volumes or the built-in synthetic CT), not images."""
        from unetpp_tf.data.medical_io import is_scan_folder, list_scans  # deferred: the data package imports TF

        if self.images or self.masks:  # explicit folders take the place of --data
            return bool(self.images) and Path(self.images).is_dir() and bool(list_scans(self.images))
        if self.data == SYNTHETIC_CT:
            return True
        return not (self.data == "synthetic" or self.data.startswith("tfds:")) and is_scan_folder(self.data)

    @property
    def volumetric(self) -> bool:
        """Whether the model is a 3D network (scans with `volume_mode="3d"`)."""
        return self.on_scans and self.volume_mode == "3d"

    def _fill_recipe(self) -> None:
        """Give the settings left at None their value for this kind of data."""
        for key, value in self.recipe().items():
            if getattr(self, key) is None:
                setattr(self, key, value)

    def recipe(self) -> dict:
        """The data-dependent defaults for this configuration's data (see `IMAGE_RECIPE`, `VOLUME_RECIPES`)."""
        return VOLUME_RECIPES[self.volume_mode] if self.on_scans else IMAGE_RECIPE

    def _check_volume_settings(self) -> None:
        """Refuse scan settings on image data, and scan settings that contradict each other."""
        volume_only = ("patch_size", "spacing")
        if not self.on_scans:
            for key in volume_only:
                if getattr(self, key) is not None:
                    raise ValueError(
                        f"{_flag(key)} is for scans (--data {SYNTHETIC_CT} or a folder of NIfTI/DICOM scans); "
                        f"{self.data!r} holds images: use --image-size / --crop-size."
                    )
            return
        for flag, value in (("--image-size", self.image_size), ("--crop-size", self.crop_size)):
            if value is not None:
                raise ValueError(f"{flag} is for images; scans train on patches: use --patch-size.")
        wanted = 3 if self.volume_mode == "3d" else 2
        sizes_ok = all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in self.patch_size)
        if len(self.patch_size) != wanted or not sizes_ok:
            axes = "DEPTH HEIGHT WIDTH" if wanted == 3 else "HEIGHT WIDTH"
            raise ValueError(
                f"--patch-size {_flag_value(self.patch_size)}: --volume-mode {self.volume_mode} takes {wanted} "
                f"positive sizes ({axes})."
            )
        if self.spacing is not None and (len(self.spacing) != 3 or any(s <= 0 for s in self.spacing)):
            raise ValueError(f"--spacing {_flag_value(self.spacing)}: give 3 positive voxel sizes in mm (Z Y X).")
        if self.slices % 2 == 0:
            raise ValueError(f"--slices {self.slices} must be odd: the centre slice is labelled, with as many "
                             "neighbours on each side (e.g. 3 or 5).")
        if not 0.0 <= self.foreground_share <= 1.0:
            raise ValueError(f"--foreground-share must be in [0, 1], got {self.foreground_share}.")
        if self.has_encoder and self.volume_mode == "3d":
            raise ValueError("--encoder and --arch deeplabv3plus are 2D networks: use --volume-mode 2.5d with them.")
        for flag, value in (("--folds", self.folds), ("--group-by", self.group_by)):
            if value:
                raise ValueError(f"{flag} is for image folders; scans are split by scan already.")

    @property
    def has_encoder(self) -> bool:
        """Whether the model sits on a keras.applications encoder (DeepLabV3+ always does)."""
        return self.encoder is not None or self.arch == "deeplabv3plus"

    def _check_model(self) -> None:
        """Refuse model settings that contradict each other, naming the flags."""
        if self.encoder is not None:
            self.encoder = _encoder_key(self.encoder)
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if not 0.0 < self.finetune_lr_factor <= 1.0:
            raise ValueError(
                f"finetune_lr_factor must be in (0, 1] (it lowers the learning rate when the encoder unfreezes), "
                f"got {self.finetune_lr_factor}."
            )
        if self.arch == "deeplabv3plus":
            self._check_deeplab()
        elif self.encoder is not None:
            if self.preset:
                raise ValueError(
                    f"--preset {self.preset} is a configuration of the built-in encoder and cannot take "
                    f"--encoder {self.encoder}; drop one of them."
                )
            if self.depth > 4:
                raise ValueError(
                    f"--depth {self.depth} is too deep for --encoder {self.encoder}: its feature maps stop at stride "
                    "32, which is depth 4; use --depth 4 or less."
                )
        if self.has_encoder and self.recompute:
            raise ValueError(
                "--recompute is for the built-in encoder; with --encoder train without it (or with a smaller "
                "--batch-size, or --freeze-encoder-epochs, which keeps the encoder out of the backward pass)."
            )
        if not self.has_encoder:
            for flag, value in (("--encoder-weights", self.encoder_weights),
                                ("--freeze-encoder-epochs", self.freeze_encoder_epochs)):
                if value:
                    raise ValueError(f"{flag} needs an --encoder (e.g. --encoder resnet50) to load or freeze.")
        if self.freeze_encoder_epochs > self.epochs:
            raise ValueError(
                f"--freeze-encoder-epochs {self.freeze_encoder_epochs} is more than the {self.epochs} --epochs; "
                f"freeze for at most {self.epochs} epochs ({self.epochs} keeps the encoder frozen to the end)."
            )

    def _check_deeplab(self) -> None:
        if self.deep_supervision:
            raise ValueError(
                "--deep-supervision needs UNet++ (one head per decoder column); DeepLabV3+ has a single head. "
                "Drop --deep-supervision or use --arch unetpp."
            )
        if self.preset:
            raise ValueError(f"--preset {self.preset} configures UNet++ and U-Net, not --arch deeplabv3plus; drop it.")
        defaults = {f.name: f.default for f in dataclasses.fields(self)} | self.recipe()
        unused = [name for name in ("depth", "filters", "upsampling", "l2") if getattr(self, name) != defaults[name]]
        if unused:
            given = ", ".join(f"--{name} {_flag_value(getattr(self, name))}" for name in unused)
            raise ValueError(
                f"--arch deeplabv3plus does not use {given}: they shape the UNet++ and U-Net decoders "
                "(DeepLabV3+'s widths and rates are its own); drop them."
            )

    def size_multiple(self) -> int:
        """What the training images' height and width must be divisible by: the model's downsampling.

        2**depth for UNet++ and U-Net on their own encoder; 2**(depth + 1) on a pretrained encoder,
        whose first map is at stride 2 (32 at depth 4); 16 for DeepLabV3+ (output stride 16).

        Example:
            >>> TrainConfig(encoder="resnet50").size_multiple()
            32
        """
        if self.arch == "deeplabv3plus":
            return DEEPLAB_OUTPUT_STRIDE
        depth = self.depth
        if self.preset:
            from unetpp_tf.models.presets import PRESETS  # deferred: it imports Keras

            depth = PRESETS.get(self.preset, {}).get("depth", depth)
        return 2 ** (depth + (self.encoder is not None))

    def check_training_size(self) -> None:
        """Refuse an `image_size` (or a folder's `crop_size`) the model cannot train on, saying which sizes work.

        Example:
            >>> TrainConfig(encoder="resnet50", image_size=(100, 100)).check_training_size()   # raises
        """
        if self.on_scans:  # patches are checked against the pooling the scans' spacing gives (training.py)
            return
        folder = self.images or self.masks or not (self.data == "synthetic" or self.data.startswith("tfds:"))
        if self.crop_size and folder:
            self.check_size(self.crop_size, "--crop-size")  # folder data trains on the crops
        elif self.image_size:
            self.check_size(self.image_size, "--image-size")

    def check_size(self, size, given_as: str) -> None:
        """Refuse a training image size the model cannot take, saying which sizes work.

        Args:
            size: tuple. (height, width).
            given_as: str. Where the size came from, for the message (e.g. "--image-size").

        Example:
            >>> TrainConfig().check_size((100, 100), "--image-size")   # raises: ... use e.g. --image-size 96 96
        """
        multiple = self.size_multiple()
        if all(int(s) % multiple == 0 for s in size):
            return
        if self.arch == "deeplabv3plus":
            model = f"DeepLabV3+ (output stride {multiple})"
        elif self.encoder is not None:
            model = f"--encoder {self.encoder} under a depth-{self.depth} decoder"
        else:
            model = f"--depth {self.depth}"
        fits = " ".join(str(max(multiple, round(int(s) / multiple) * multiple)) for s in size)
        raise ValueError(
            f"{given_as} {' '.join(str(s) for s in size)} does not fit the model: {model} downsamples {multiple}x, so "
            f"height and width must be multiples of {multiple}; use e.g. {given_as} {fits}."
        )

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


def _encoder_key(name: str) -> str:
    """The `ENCODERS` key of an encoder name (any case, '-' or '_' allowed), or an error listing them."""
    from unetpp_tf.models.encoders import ENCODERS, encoder_spec  # deferred: it imports Keras

    try:
        spec = encoder_spec(name)
    except ValueError as error:
        raise ValueError(f"--encoder: {error}") from None
    return next(key for key, row in ENCODERS.items() if row is spec)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _flag_value(value) -> str:
    return " ".join(str(v) for v in value) if isinstance(value, (tuple, list)) else str(value)


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
