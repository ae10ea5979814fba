"""``python -m bench``: see :mod:`bench.run`."""

from .run import main

if __name__ == "__main__":
    main()
