"""The one exception type users see.

Every error a user can cause (a bad data record, a YAML typo, a missing model) is raised as a
`UserError` whose message says what is wrong and where (file:line, field). The CLI prints the
message without a traceback and exits non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by user input, with a message that names the place and the fix."""
