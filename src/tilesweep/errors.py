"""Errors that carry a message meant for the user."""


class UsageError(ValueError):
    """A user's bad input: a bbox, zoom, template, file or option.

    The CLI prints its message as one line and exits with status 2; the message must name
    the bad value. Raise it before anything is written."""
