"""The one exception type users see, and the one way an exception becomes a line of text.

Every error that bad input can cause (a bad plan, a bad checkpoint, a broken engine directory) is a
`CqilError` whose message names the problem and, where possible, how to fix it. The CLIs print the
message on one line and exit with status 2; anything else escaping is a bug.
"""


class CqilError(Exception):
    """A user-facing error: the message is complete and fits on one line."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """The first non-empty line of an exception's message, or its type name when it has none.

    Third-party errors (ONNX Runtime, safetensors, gloo, peft) often carry pages of context; a
    `CqilError` quoting one keeps only this line.
    """
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__
