"""Errors a user can fix: each message names the file, key or value and what was expected."""


class MedsegError(Exception):
    """Bad input: a wrong config value, a missing or malformed file.

    Entry points print the message alone (no traceback) and exit non-zero.
    """


class ConfigError(MedsegError):
    """A config entry has the wrong type or value, or names something that does not exist."""


class DataError(MedsegError):
    """A data file or folder is missing or does not have the documented layout."""


class TrainingDivergedError(MedsegError):
    """The loss became NaN or infinite; training stopped before it corrupted more state."""


def describe(error: BaseException) -> str:
    """``TypeName: first line of the message`` (just the type when the message is empty), for
    naming a library's failure inside one of our messages."""
    lines = str(error).splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class Interrupted(KeyboardInterrupt):
    """Ctrl-C (SIGINT) or SIGTERM stopped the work. ``checkpoint`` is the newest file that
    training can resume from (None when none was written); ``epoch`` the epoch it holds;
    ``training`` whether it stopped a training loop.

    A KeyboardInterrupt, so that Sacred records the run as INTERRUPTED and cleanup written
    for Ctrl-C (staging folders, temporary checkpoint files) runs for SIGTERM too.
    """

    def __init__(self, signal_name: str = "SIGINT", checkpoint=None, epoch: int | None = None,
                 training: bool = False):
        super().__init__(signal_name)
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        self.epoch = epoch
        self.training = training


class DiskFullError(MedsegError):
    """A write failed for want of space (ENOSPC, or a quota: EDQUOT)."""
