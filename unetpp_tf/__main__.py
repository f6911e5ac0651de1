"""`python -m unetpp_tf` runs the command line."""

from unetpp_tf.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
