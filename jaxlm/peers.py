"""A dead peer stops a multi-process run within seconds, with one sentence.

When one process of a JAX multi-process run dies, the others block in their next collective
until the coordination service's heartbeat timeout (100 s by default, set in
`jax.distributed.initialize`) and then abort with a C++ check-failure dump. `Watchdog` beats
its own heartbeat through the coordination service's key-value store once a second and reads
the others'; a peer silent for `timeout_s`, or one that failed, ends this process with one
`error:` line. A process that leaves cleanly marks itself done first, so a peer still finishing
its last save is not taken for dead.

Not covered: when process 0 dies the coordination service dies with it, and jax's own client
aborts the others at once (fast, but with its C++ dump: its error callback is chosen in
`jax.distributed.initialize`, which `sharding.maybe_initialize_distributed` calls).
"""

from __future__ import annotations

import os
import sys
import threading
import time

import jax

from jaxlm.errors import PeerLost

_DONE, _FAILED = "done", "failed"
_PREFIX = "jaxlm/heartbeat/"


def _client():
    # The runtime client jax.distributed.initialize made; jax has no public handle to it.
    from jax._src import distributed

    return distributed.global_state.client


class Watchdog:
    """Heartbeats between the processes of one run; a no-op on a single process."""

    def __init__(self, timeout_s: float = 10.0, interval_s: float = 1.0):
        """Args:
        timeout_s: how long a peer may stay silent before it is taken for dead.
        interval_s: seconds between this process's heartbeats (and its checks of the others).
        """
        self.timeout_s, self.interval_s = timeout_s, interval_s
        self.client = _client() if jax.process_count() > 1 else None
        self.me, self.count = jax.process_index(), jax.process_count()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._run, name="jaxlm-peer-watchdog", daemon=True)

    def start(self) -> Watchdog:
        """Starts beating and watching (in a daemon thread); returns self."""
        if self.client is not None:
            self.thread.start()
        return self

    def stop(self, clean: bool = True) -> None:
        """Stops watching; tells the others this process left on purpose, or with an error.

        A process that fails (an exception, not a crash) says so, so that the others, which may
        be blocked in a collective it will never join, stop at once instead of after the timeout.
        """
        if self.client is None or not self.thread.is_alive():
            return
        self.stopped.set()
        self.thread.join()
        try:
            value = _DONE if clean else _FAILED
            self.client.key_value_set(self._key(self.me), value, allow_overwrite=True)
        except Exception:  # noqa: BLE001 - the coordinator may already be gone at exit
            pass

    def _key(self, process: int) -> str:
        return f"{_PREFIX}{process}"

    def _run(self) -> None:
        beat = 0
        last_seen: dict[int, tuple[str, float]] = {}  # peers seen once: (value, when it changed)
        while not self.stopped.wait(self.interval_s if beat else 0):
            beat += 1
            try:
                self.client.key_value_set(self._key(self.me), str(beat), allow_overwrite=True)
                values = dict(self.client.key_value_dir_get(_PREFIX))
            except Exception as e:  # noqa: BLE001 - gRPC errors: the coordinator is unreachable
                if not self.stopped.is_set():
                    reason = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
                    self._die(f"the coordinator (process 0) stopped answering ({reason})")
                return
            now = time.monotonic()
            for p in range(self.count):
                # A peer is watched from its first beat on: before that it may still be starting.
                value = values.get(self._key(p))
                if p == self.me or value is None or value == _DONE:
                    continue
                if value == _FAILED:
                    self._die(f"process {p} stopped with an error (see its log)")
                if p not in last_seen or value != last_seen[p][0]:
                    last_seen[p] = (value, now)
                elif now - last_seen[p][1] > self.timeout_s:
                    self._die(f"process {p} sent no heartbeat for {self.timeout_s:.0f} s")

    def _die(self, what: str) -> None:
        # Called from the watchdog thread while the main thread may be blocked in a collective
        # that will never return: exit the whole process from here.
        sys.stderr.write(
            f"error: {what} and is taken for dead; process {self.me} of {self.count} stops too. "
            "Checkpoints already written are kept: restart every process to resume.\n"
        )
        sys.stderr.flush()
        os._exit(1)


# Words of the runtime errors a collective raises when a peer's connection is gone (gloo on
# CPU, NCCL on GPU, the gRPC status of a lost task): anything else (out of memory, a bug) keeps
# its own traceback.
_LOST_PEER_WORDS = ("gloo", "nccl", "connection", "unavailable", "peer", "deadline_exceeded")


def raise_if_peer_lost(error: BaseException) -> None:
    """Raises PeerLost if `error` is a collective failing because another process died."""
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return
    first_line = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    if any(word in first_line.lower() for word in _LOST_PEER_WORDS):
        raise PeerLost(
            f"a collective operation with the other processes failed ({first_line}): a peer "
            "process has most likely died. Checkpoints already written are kept: restart every "
            "process to resume."
        ) from None
