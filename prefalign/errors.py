"""User-facing errors.

Anything the user can fix (a bad file, a bad row, a bad flag, a missing package) raises `UserError`
with one line that says where and what to do. The CLI prints it as ``error: <message>`` and exits 2,
with no traceback.
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line, exit code 2."""

    exit_code = 2
