"""`python -m unetpp_tf.export REQUEST`: the TensorFlow process that exports for another Keras backend.

`export_model` starts it (see `unetpp_tf.export.tensorflow_process`); it is not a user command.

Example:
    >>> # KERAS_BACKEND=tensorflow python -m unetpp_tf.export request.json
"""

import sys

from unetpp_tf.export.tensorflow_process import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
