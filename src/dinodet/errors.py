"""The one exception type for mistakes in what a user gave: a file, a setting, a value.

Every error that a user can fix by changing their input derives from :class:`UserError`
(a ``ValueError``): :class:`~dinodet.weights.CheckpointError`,
:class:`~dinodet.data.images.ImageReadError`, :class:`DataError`, :class:`RunDirError`.
The command line catches it and prints its message, which names the file, key or value,
with exit status 2 and no traceback (``dinodet --debug ...`` shows the traceback).
"""

from __future__ import annotations

__all__ = ["DataError", "RunDirError", "UserError"]


class UserError(ValueError):
    """Something the user gave is wrong; the message says what and where."""


class DataError(UserError):
    """A dataset (annotation file, image folder, image) cannot be used as it is."""


class RunDirError(UserError):
    """A run or output directory cannot be used: not writable, a file, or held by another
    running process."""
