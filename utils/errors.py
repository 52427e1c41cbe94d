"""The one exception type for expected failures (bad paths, bad files, bad flags)."""


class UserError(Exception):
    """A failure caused by the input (paths, files, flags), reported without a traceback."""
