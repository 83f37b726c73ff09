"""The two kinds of failure the command line tells apart (README.md, "Running")."""


class ConfigError(ValueError):
    """Bad input: one line on stderr, exit 2, nothing written."""


class RunFailed(RuntimeError):
    """A failure during the run (exit 1): rerunning the same command resumes."""
