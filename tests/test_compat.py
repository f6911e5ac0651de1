"""The default path survives a Keras upgrade: public API only, the same training as the
concatenated graph, saved files (today's and those of earlier versions) load and train on."""

import ast
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import numpy as np
import pytest

import unetpp_tf
from test_nested_model import _gradients  # loss, gradients and moving statistics of one training call
from unetpp_tf.models import ConcatConv2D, NestedModel, RecomputedModel, blocks, size_divisor

VARIANTS = {"bn": dict(batch_norm=True, dropout=0.0), "paper": dict(batch_norm=False, dropout=0.5),
            "bn+dropout": dict(batch_norm=True, dropout=0.3)}
PRIVATE = ("keras.src", "tensorflow.python")

DEFAULT_PATH = """
import json, sys
import numpy as np
import unetpp_tf

model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True, dropout=0.2)
model.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss())
x = np.random.default_rng(0).random((2, 32, 32, 1), dtype=np.float32)
model.fit(x, ((x > 0.5).astype("int32"),) * 2, epochs=1, verbose=0)
ours = {name: getattr(module, "__file__", None) for name, module in sys.modules.items()
        if name == "unetpp_tf" or name.startswith("unetpp_tf.")}
print(json.dumps({"type": type(model).__name__, "modules": ours}))
"""


def _private_uses(path: Path) -> list[str]:
    """Imports of, or attribute chains through, keras.src / tensorflow.python in a source file."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Attribute):
            names = [ast.unparse(node)]
        else:
            continue
        found += [f"{path.name}:{node.lineno}: {name}" for name in names if name.startswith(PRIVATE)]
    return found


def test_private_uses_are_found(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import keras\nfrom tensorflow.python.eager import record\nx = keras.src.tree\ny = keras.ops\n")
    assert set(_private_uses(probe)) == {
        "probe.py:2: tensorflow.python.eager", "probe.py:3: keras.src.tree", "probe.py:3: keras.src"
    }


def test_no_module_of_the_package_imports_keras_or_tensorflow_internals():
    # the opt-in recomputation included: it reads Keras' graph structures, but imports nothing private
    package = Path(unetpp_tf.__file__).parent
    assert [use for path in sorted(package.rglob("*.py")) for use in _private_uses(path)] == []


def test_default_path_imports_no_keras_internals():
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run([sys.executable, "-c", DEFAULT_PATH], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["type"] == "Functional"  # a plain keras.Model
    modules = report["modules"]
    assert "unetpp_tf.models.layers" in modules and "unetpp_tf.models.recompute" in modules
    assert "unetpp_tf.models.recompute_graph" not in modules  # the opt-in internals never loaded
    assert [use for path in sorted(filter(None, modules.values())) for use in _private_uses(Path(path))] == []


def concat_then_conv2d(*args, name: str, **kwargs):
    """The graph before ConcatConv2D: a Concatenate layer, then a Conv2D over its output."""
    conv = keras.layers.Conv2D(*args, name=name, **kwargs)
    return lambda parts: conv(keras.layers.Concatenate(name=name.replace("_conv1", "_concat"))(parts))


def _tiny(monkeypatch=None, **options):
    keras.utils.set_random_seed(1)
    if monkeypatch is None:
        return unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True, **options)
    with monkeypatch.context() as patch:
        patch.setattr(blocks, "ConcatConv2D", concat_then_conv2d)
        return unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True, **options)


def _seed_states(model):
    return {layer.name: layer.seed_generator.state for layer in model.layers if isinstance(layer, keras.layers.Dropout)}


@pytest.mark.parametrize("variant", VARIANTS)
def test_default_training_equals_the_concatenated_graph(variant, images, monkeypatch):
    model = _tiny(**VARIANTS[variant])
    reference = _tiny(monkeypatch, **VARIANTS[variant])
    assert sum(isinstance(layer, keras.layers.Concatenate) for layer in reference.layers) == 3
    assert sum(isinstance(layer, ConcatConv2D) for layer in model.layers) == 3
    assert [v.shape for v in reference.weights] == [v.shape for v in model.weights]
    assert reference.count_params() == model.count_params()
    reference.set_weights(model.get_weights())
    for name, state in _seed_states(model).items():
        _seed_states(reference)[name].assign(state)
    loss, grads, moving = _gradients(model, images)
    loss_r, grads_r, moving_r = _gradients(reference, images)
    assert loss == pytest.approx(loss_r, rel=1e-6)
    scale = max(np.abs(g).max() for g in grads_r)
    for g, g_r in zip(grads, grads_r):
        np.testing.assert_allclose(g, g_r, rtol=0, atol=1e-6 * scale)
    for m, m_r in zip(moving, moving_r):  # BatchNorm statistics and dropout seeds moved alike
        np.testing.assert_allclose(m, m_r, rtol=0, atol=1e-6)
    for a, b in zip(model(images, training=False), reference(images, training=False)):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_saved_model_round_trip_trains_on_alike(images, tmp_path):
    masks = [(images > 0.5).astype("int32")] * 2
    model = _tiny(dropout=0.0)
    model.compile(keras.optimizers.Adam(1e-2), loss=unetpp_tf.losses.BCEDiceLoss())
    model.train_on_batch(images, masks)
    model.save(tmp_path / "model.keras")
    loaded = keras.models.load_model(tmp_path / "model.keras", safe_mode=True)
    assert not isinstance(loaded, (NestedModel, RecomputedModel))
    assert isinstance(loaded.get_layer("x_0_2_conv1"), ConcatConv2D)
    assert loaded.get_layer("x_0_2_conv1").part_channels == [4, 4, 4]
    assert loaded.count_params() == model.count_params()
    for a, b in zip(model.predict(images, verbose=0), loaded.predict(images, verbose=0)):
        np.testing.assert_allclose(b, a, atol=1e-6)
    # the optimizer state came back too: one more step lands on the same (moved) weights
    before = model.get_weights()
    model.train_on_batch(images, masks)
    loaded.train_on_batch(images, masks)
    assert not np.allclose(model.get_weights()[0], before[0])
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_allclose(b, a, atol=1e-5)


def _as_earlier_version(path: Path) -> None:
    """Rewrite a saved plain model's class to the NestedModel of earlier versions, as they saved it."""
    with zipfile.ZipFile(path) as archive:
        entries = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(entries["config.json"])
    assert config["class_name"] == "Functional"
    config.update(module="unetpp_tf.models.nested_model", class_name="NestedModel",
                  registered_name="unetpp_tf>NestedModel")
    entries["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries.items():
            archive.writestr(name, data)


def test_nested_model_files_of_earlier_versions_load(images, tmp_path, monkeypatch):
    old = _tiny(monkeypatch, batch_norm=True, dropout=0.1)  # their graph: Concatenate, then Conv2D
    old.compile("adam", loss=unetpp_tf.losses.BCEDiceLoss())
    masks = [(images > 0.5).astype("int32")] * 2
    old.train_on_batch(images, masks)
    old.save(tmp_path / "old.keras")
    _as_earlier_version(tmp_path / "old.keras")
    loaded = keras.models.load_model(tmp_path / "old.keras", safe_mode=True)
    assert type(loaded) is NestedModel and loaded.get_layer("x_0_1_concat")
    for a, b in zip(old.predict(images, verbose=0), loaded.predict(images, verbose=0)):
        np.testing.assert_allclose(b, a, atol=1e-6)
    assert np.all(np.isfinite(loaded.train_on_batch(images, masks)))
    assert unetpp_tf.prune(loaded, 1).count_params() == unetpp_tf.prune(old, 1).count_params()
    assert size_divisor(loaded) == 4
