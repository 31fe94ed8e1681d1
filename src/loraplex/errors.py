"""The one exception type users see.

Every error a user can cause (a bad data record, a YAML typo, a missing model) is raised as a
`UserError` whose message says what is wrong and where (file:line, field). The CLI prints the
message without a traceback and exits non-zero; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """An error caused by user input, with a message that names the place and the fix."""


class NotFound(UserError):
    """The input names something that does not exist (an adapter, version, alias, job): an HTTP 404."""


class Conflict(UserError):
    """A well-formed request the current state refuses (an alias with no earlier version to go
    back to): an HTTP 409."""


class UpstreamError(Exception):
    """An OpenAI-compatible endpoint behind loraplex (an upstream, the vLLM engine) failed or refused:
    relayed to the client with `status` and `code` (a 502 when it is unreachable)."""

    def __init__(self, status: int, message: str, code: str = "upstream_error"):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


class Unprocessable(UserError):
    """A well-formed request whose content cannot be used (an uploaded data file with invalid
    records, a base directory that holds no model): an HTTP 422."""
