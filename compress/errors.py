"""Errors a user can cause or a CI job can act on, each with its own exit code.

Exit codes are an interface: 0 success, 1 a bug, 2 a user error (bad recipe, unreadable or
untrusted file, data that does not fit the model, NaN loss), 3 a gate missed, 4 the exported ONNX
model disagrees with the torch model beyond the recipe's tolerance, 130 interrupted (SIGINT), 143
terminated (SIGTERM).
"""


class CompressError(Exception):
    """Base of the errors that end a run with a one-line message."""

    exit_code = 1


class UserError(CompressError):
    """Something the user can fix: the message names the file or key and the fix."""

    exit_code = 2


class RecipeError(UserError):
    """The recipe is not valid (syntax, unknown key, wrong type, target matching nothing)."""


class GateFailed(CompressError):
    """A quality or speed gate from the recipe or command line was missed (report still written)."""

    exit_code = 3


class ParityError(CompressError):
    """ONNX Runtime output differs from torch beyond tolerance: the ONNX model is not kept."""

    exit_code = 4


class Terminated(BaseException):
    """SIGTERM (what CI runners and schedulers send) arrived outside fine-tuning: unwind like Ctrl-C,
    removing what the run had half-written, and exit 143. A BaseException, like KeyboardInterrupt,
    so that no `except Exception` on the way swallows it."""


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message (its type name when it has none), for one-line errors."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]
