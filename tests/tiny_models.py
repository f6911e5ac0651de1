"""A tiny deep-supervision UNet++ fitted briefly: what the export and pruning tests score and export."""

import keras
import numpy as np

import unetpp_tf


def fit_deep_supervision(data, epochs: int, *, check_both_classes: bool = True, **options) -> keras.Model:
    """Build a depth-2, 4-filter UNet++ with deep supervision on 32x32x1 and fit it on `data.train`.

    One BCE-Dice loss per head, seed 0, learning rate 1e-2. With `check_both_classes`, the
    model must predict between 10% and 90% foreground on `data.test`, so that agreement
    figures mean something.

    Example:
        >>> model = fit_deep_supervision(unetpp_tf.data.synthetic(48, image_size=(32, 32)), epochs=3)
    """
    keras.utils.set_random_seed(0)
    model = unetpp_tf.build_unetpp((32, 32, 1), depth=2, filters=4, deep_supervision=True, **options)
    heads = len(model.outputs)
    model.compile(keras.optimizers.Adam(1e-2), loss=[unetpp_tf.losses.BCEDiceLoss()] * heads)
    model.fit(data.train.map(lambda x, y: (x, (y,) * heads)), epochs=epochs, shuffle=False, verbose=0)
    if check_both_classes:
        images = np.concatenate([x for x, _ in data.test.as_numpy_iterator()])
        foreground = (unetpp_tf.inference_model(model).predict(images, verbose=0) >= 0.5).mean()
        assert 0.1 < foreground < 0.9, f"the fixture model predicts {foreground:.0%} foreground"
    return model
