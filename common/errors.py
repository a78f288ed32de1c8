"""The one exception the package raises for what a user can fix (bad input, missing data, a diverged run).

Scripts end with cli.run_main, which prints it as one `error: ...` line and exits with status 2."""
from __future__ import annotations


class UserError(Exception):
    """Bad input or a failed run that the user can fix: reported as one line, exit status 2."""
