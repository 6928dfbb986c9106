"""The one exception type users see: a clear message, no traceback, CLI exit code 2."""


class NetslimError(Exception):
    """Bad input or an impossible request, stated in words a user can act on."""
