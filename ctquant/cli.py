"""The ``ctquant`` command line: thin glue over the library modules.

Each command catches :class:`ctquant.errors.CtquantError`, prints one line
``ctquant: error: <path>: <reason>`` on stderr and exits with the error's code (see
:mod:`ctquant.errors`). Unexpected exceptions exit with 1; ``--debug`` shows their traceback.
"""

from __future__ import annotations

import functools
import logging
import sys
import traceback
from pathlib import Path
from typing import Callable, Optional

import typer

from . import __version__
from .errors import CtquantError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Chest CT quantification of COVID-19 pneumonia: lungs, GGO, consolidation, trial endpoints.",
    pretty_exceptions_enable=False,
)

_STATE = {"debug": False}
log = logging.getLogger("ctquant")


def _fail(message: str, code: int) -> None:
    typer.echo(f"ctquant: error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(func: Callable) -> Callable:
    """Turn library errors into one-line messages and documented exit codes."""

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except typer.Exit:
            raise
        except CtquantError as exc:
            if _STATE["debug"]:
                traceback.print_exc()
            _fail(str(exc), exc.exit_code)
        except KeyboardInterrupt:
            _fail("interrupted", 130)
        except Exception as exc:  # a bug: keep the message on one line unless --debug
            if _STATE["debug"]:
                traceback.print_exc()
            first = str(exc).splitlines()[0] if str(exc) else ""
            _fail(f"internal error ({type(exc).__name__}: {first}); rerun with --debug and report it", 1)

    return wrapper


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"ctquant {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    version: Optional[bool] = typer.Option(
        None, "--version", callback=_version_callback, is_eager=True, help="Print the version."
    ),
) -> None:
    _STATE["debug"] = debug
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        format="ctquant: %(levelname)s: %(message)s",
        stream=sys.stderr,
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
