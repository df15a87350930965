"""``python -m scripts.eval``: see :mod:`scripts.eval.run`."""

from .run import main

main()
