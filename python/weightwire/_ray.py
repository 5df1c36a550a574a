"""Ray plumbing shared by the modes: joining a cluster, and coordinator calls with deadlines and
typed errors."""

from __future__ import annotations

import logging
from typing import Any

from weightwire.config import TransferConfig
from weightwire.coordinator import coordinator_actor
from weightwire.errors import CoordinatorError, TransferTimeoutError

logger = logging.getLogger(__name__)


def ensure_ray(config: TransferConfig) -> Any:
    """The ray module, connected: to config.ray_address if given, else to the cluster this
    process already uses, else to a new local one (the embedded default)."""
    import ray

    if not ray.is_initialized():
        logger.info("connecting to Ray at %s", config.ray_address or "a new local cluster")
        ray.init(address=config.ray_address, namespace=config.ray_namespace, include_dashboard=False,
                 configure_logging=False)
    return ray


class CoordinatorClient:
    """This process's handle on the coordinator actor, attached as `user_id` until detach()."""

    def __init__(self, config: TransferConfig, user_id: str) -> None:
        self._ray = ensure_ray(config)
        self._name = config.coordinator_name
        self._timeout_s = config.timeout_s
        self._user_id = user_id
        for attempt in (1, 2):
            try:
                self.actor = coordinator_actor(config.coordinator_name, config.ray_namespace)
            except Exception as exc:  # noqa: BLE001 - any failure to create it is a coordinator failure
                raise CoordinatorError(f"cannot create coordinator {self._name!r}: {exc}") from exc
            try:
                self.call("attach", user_id)
                return
            except CoordinatorError:
                # Found it just as its last user removed it: the second get_if_exists creates a
                # fresh one.
                if attempt == 2:
                    raise

    def get(self, ref: Any, timeout_s: float, what: str) -> Any:
        """ray.get with a deadline; Ray's failures become weightwire's errors."""
        ray = self._ray
        try:
            return ray.get(ref, timeout=max(timeout_s, 0.001))
        except ray.exceptions.GetTimeoutError:
            ray.cancel(ref)
            raise TransferTimeoutError(
                f"coordinator {self._name!r}: {what} took longer than {timeout_s:.3g} s") from None
        except ray.exceptions.RayActorError as exc:
            raise CoordinatorError(f"coordinator {self._name!r} is gone ({what}): {exc}") from None
        except ray.exceptions.RayTaskError as exc:
            raise CoordinatorError(f"coordinator {self._name!r} refused {what}: {exc.cause!r}") from None

    def call(self, method: str, *args: Any, timeout_s: float | None = None) -> Any:
        timeout = self._timeout_s if timeout_s is None else timeout_s
        return self.get(self.actor.call.remote(method, *args), timeout, method)

    def wait(self, method: str, *args: Any, timeout_s: float) -> Any:
        """A long-poll (wait_requests, wait_ticket, wait_newer) bounded by timeout_s, plus slack
        for the call itself."""
        # The actor answers by timeout_s; the slack only covers the reply's trip back.
        return self.get(getattr(self.actor, method).remote(*args, timeout_s), timeout_s + 1.5, method)

    def ready(self, ref: Any, timeout_s: float) -> bool:
        """Whether `ref` has its answer, waiting at most timeout_s."""
        done, _ = self._ray.wait([ref], timeout=timeout_s)
        return bool(done)

    def call_soon(self, method: str, *args: Any) -> None:
        """Fire and forget, for bookkeeping off the critical path (a failure is only logged by Ray)."""
        self.actor.call.remote(method, *args)

    def detach(self) -> None:
        """Leaves; the last user to leave removes the coordinator."""
        try:
            remaining = self.call("detach", self._user_id, timeout_s=min(self._timeout_s, 10.0))
        except (CoordinatorError, TransferTimeoutError) as exc:
            logger.warning("detaching from coordinator %r: %s", self._name, exc)
            return
        if remaining == 0:
            logger.info("last user left: removing coordinator %r", self._name)
            self._ray.kill(self.actor)
