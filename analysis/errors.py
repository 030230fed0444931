"""User-facing errors: one line, no traceback, exit code 2 from every command."""


class UserError(Exception):
    """A problem with what the user asked for (bad model id, missing text, too few tokens...).

    Commands print ``error: <message>`` on one line and exit with code 2; the dashboard shows the
    message in an error box. Anything else that escapes is a bug and keeps its traceback.
    """
