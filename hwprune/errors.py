"""User-facing errors: one clear line saying what is wrong and how to fix it.

The CLI prints ``str(err)`` of an :class:`HwpruneError` as a single line and exits non-zero;
anything else is a bug and gets a traceback.
"""

from __future__ import annotations

__all__ = ["HwpruneError", "ParityError", "TargetUnreachableError"]


class HwpruneError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class TargetUnreachableError(HwpruneError):
    """The requested speedup is beyond what the pruning space can reach."""


class ParityError(HwpruneError):
    """The exported model's output does not match the pruned torch model."""
