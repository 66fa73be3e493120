"""Two ways a run ends early without a traceback: a user mistake (exit 2) and a stopped run (exit 1)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class UserInputError(Exception):
    """A user mistake. The message is complete: what is wrong, where, what was expected, how to fix it."""


class TrainingStopped(Exception):
    """The run cannot go on (e.g. non-finite steps); the message says why and what is safe to resume from."""


def exit_on_user_error(fn: Callable[[], T]) -> T:
    """Run `fn`; a `UserInputError` exits with status 2, a `TrainingStopped` with status 1, each with its message on
    stderr and no traceback."""
    try:
        return fn()
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    except TrainingStopped as error:
        print(f"stopped: {error}", file=sys.stderr)
        raise SystemExit(1) from None
