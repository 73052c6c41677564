"""The one exception type users see.

Anything the user can fix (a missing path, an unknown alias, a malformed
recipe, a value out of range) raises ``LlmpressError`` with a one-line
message that names the problem and the fix. The CLI prints it and exits 2.
"""


class LlmpressError(Exception):
    """A problem with the user's input, reported as one line; never a bug."""
