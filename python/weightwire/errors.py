"""The one exception hierarchy every weightwire failure is raised through.

Each class also derives from the builtin a caller would naturally catch, so ``except TimeoutError``
or ``except ValueError`` keeps working around weightwire calls.
"""

from __future__ import annotations


class WeightTransferError(Exception):
    """Base class of every error weightwire raises on purpose."""


class TransferTimeoutError(WeightTransferError, TimeoutError):
    """A wait passed its deadline (a pull, a coordinator call, a buffer from the pool)."""


class SpecMismatchError(WeightTransferError, ValueError):
    """The receiver's placeholder disagrees with the published manifest (tree, shape, dtype,
    sharding). Raised before any byte moves, so bits are never reinterpreted."""


class CoordinatorError(WeightTransferError):
    """The coordinator is missing, dead, or answered something inconsistent."""


class IntegrityError(WeightTransferError):
    """Received bytes failed their checksum; they are never returned as weights."""


class StagingExhaustedError(WeightTransferError, MemoryError):
    """A StagingPool could not supply a buffer within its capacity before the deadline."""
