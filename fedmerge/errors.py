"""The one exception type for a user's mistake."""


class FedmergeError(ValueError):
    """A user's mistake: bad config, bad checkpoint, bad client reply.

    The message names the culprit (client, tensor, key, file) and the fix. The command line prints it
    without a traceback and exits non-zero.
    """
