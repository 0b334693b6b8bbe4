"""``python -m netsurgeon.cli`` runs the CLI, as ``python -m netsurgeon`` does.

Example:
    $ python -m netsurgeon.cli passes
"""
import sys

from . import main

__all__: list[str] = []

if __name__ == "__main__":
    sys.exit(main())
