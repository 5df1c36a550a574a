"""weightwire: move model weights from a JAX trainer to RL rollout workers.

Importing the package loads only numpy and the native core; jax and ray load when a mode needs
them.
"""

from weightwire.api import (
    ClientMetrics,
    ServerMetrics,
    WeightUpdate,
    create_client,
    create_server,
    shutdown_coordinator,
)
from weightwire.config import TransferConfig, TransferMode
from weightwire.errors import (
    CoordinatorError,
    IntegrityError,
    SpecMismatchError,
    StagingExhaustedError,
    TransferTimeoutError,
    WeightTransferError,
)

__version__ = "0.1.0"

__all__ = [
    "ClientMetrics",
    "ServerMetrics",
    "TransferConfig",
    "TransferMode",
    "WeightUpdate",
    "create_client",
    "create_server",
    "shutdown_coordinator",
    "CoordinatorError",
    "IntegrityError",
    "SpecMismatchError",
    "StagingExhaustedError",
    "TransferTimeoutError",
    "WeightTransferError",
    "__version__",
]
