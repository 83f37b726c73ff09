"""The two kinds of failure the command line tells apart (README.md, "Running")."""


class ConfigError(ValueError):
    """Bad input: one line on stderr, exit 2, nothing written."""


class RunFailed(RuntimeError):
    """A failure during the run (exit 1). ``resumable``: rerunning the same command resumes and can
    help (a lost node, storage down); otherwise the message says what to change."""

    def __init__(self, message: str, resumable: bool = True):
        super().__init__(message)
        self.resumable = resumable


class Terminated(BaseException):  # not an Exception: generic handlers must not turn it into a failure
    """SIGTERM (a scheduler's stop, ``ray job stop``): the run stops as for Ctrl-C, saying so in its manifest."""
