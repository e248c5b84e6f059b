"""The one exception type users see.

Every error that bad input can cause (a bad plan, a bad checkpoint, a broken engine directory) is a
`CqilError` whose message names the problem and, where possible, how to fix it. The CLIs print the
message on one line and exit with status 2; anything else escaping is a bug.
"""


class CqilError(Exception):
    """A user-facing error: the message is complete and fits on one line."""
