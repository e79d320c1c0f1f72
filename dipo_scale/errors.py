"""The one error type users see: a one-line message naming the input and what is wrong.

The CLI catches `UserInputError`, prints `error: <message>` and exits with status 2.
"""


class UserInputError(Exception):
    """Bad input from the user (a file, a flag, a config value). Exit code 2."""

    exit_code = 2


def user_error_behind(error: BaseException | None) -> UserInputError | None:
    """The UserInputError at the root of `error`, if one is: Ray wraps an error raised in a task,
    actor or worker (its `cause`, or `__cause__`, is the original; the wrapper, itself an instance
    of the original's class, prints a remote traceback). None when none is."""
    found, seen = None, set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, UserInputError):
            found = error
        error = getattr(error, "cause", None) or error.__cause__
    return found


def run_user_error(error: BaseException) -> UserInputError | None:
    """The UserInputError behind a failed Ray job: `error`'s own root, or (a Ray Train run's
    TrainingFailedError) the root of a worker's or the controller's failure. None when none is."""
    failures = [error, *getattr(error, "worker_failures", {}).values(), getattr(error, "controller_failure", None)]
    return next(filter(None, map(user_error_behind, failures)), None)


def first_line(error: BaseException, limit: int = 160) -> str:
    """The first non-empty line of `error`'s message (its type's name when it has none), at most
    `limit` characters: what a one-line error quotes of an exception from a library."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0].strip()[:limit]
