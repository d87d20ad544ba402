"""The `rcmd` command line (also `python -m commandbus`): setup and checks, workers, sending,
the troubleshooting queue, commands, batches, stats and retention, without writing code.

Needs typer and rich (dependencies of the package); `import commandbus` does not import
this package, nor them.
"""

from commandbus.cli._app import app, main

__all__ = ["app", "main"]
