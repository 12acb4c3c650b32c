"""The ``stl`` command and the error handling shared by the DVC stage scripts.

stl models                      # the model table: names, aliases, parameters, outputs
stl params                      # every params.yaml key with its default and meaning
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from stl.distributed import main_print

USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, FileNotFoundError, RuntimeError)


def run_stage(main: Callable[[], object]) -> None:
    """Run a stage's ``main``; a user error prints one ``error: ...`` line (rank 0) and exits with status 1.

    Set ``STL_DEBUG=1`` to get the full traceback instead.
    """
    try:
        main()
    except USER_ERRORS as e:
        if os.environ.get("STL_DEBUG"):
            raise
        main_print(f"error: {e}", file=sys.stderr)
        sys.exit(1)


def _cmd_models(_: argparse.Namespace) -> None:
    from stl.models import models_markdown_table

    print(models_markdown_table())


def _cmd_params(_: argparse.Namespace) -> None:
    from stl.config import describe_keys

    for key, default, text in describe_keys():
        print(f"{key:32s} {default!s:24.24s} {text}")


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``stl`` console script."""
    parser = argparse.ArgumentParser(prog="stl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("models", help="list the registered models and aliases").set_defaults(fn=_cmd_models)
    sub.add_parser("params", help="list every params.yaml key").set_defaults(fn=_cmd_params)
    args = parser.parse_args(argv)
    args.fn(args)


if __name__ == "__main__":
    main()
