"""A dead peer stops a multi-process run within seconds, with one sentence naming it.

When one process of a JAX multi-process run dies, the others block in their next collective
until the coordination service's heartbeat timeout (100 s by default, set in
`jax.distributed.initialize`) and then abort with a C++ check-failure dump. `Watchdog` beats
its own heartbeat through the coordination service's key-value store once a second and reads
the others'; a peer silent for `timeout_s`, or one that failed, ends this process with one
`error:` line. A process that leaves cleanly marks itself done first, so a peer still finishing
its last save is not taken for dead.

Process 0 hosts the coordination service. When it dies, jax's client in every other process
sees its connection close within milliseconds and aborts with a C++ dump (its error callback,
`missed_heartbeat_callback`, is fatal by default, and a Python one cannot be given: jaxlib 0.10
fails converting the status for it and terminates). `initialize` therefore joins the other
processes to the service through `CoordinatorLink`, a byte relay in this process: it sees the
service's connection close first, and ends the process with one sentence before jax's client
can notice anything.

Not covered: a run joined by discovery (`mesh.multihost`, TPU pod or SLURM variables) calls
`jax.distributed.initialize()` itself, without the link; and a coordinator host that vanishes
without closing its connections (power loss, a cut network) is seen by jax's own heartbeat
timeout only.
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import socket
import sys
import threading
import time
from typing import NoReturn

import jax

from jaxlm.errors import PeerLost

_DONE, _FAILED, _HUNG = "done", "failed", "hung"
_PREFIX = "jaxlm/heartbeat/"
_RESUME = "Checkpoints already written are kept: restart every process to resume."
_one_exit = threading.Lock()  # the first thread to stop the process writes its one sentence
_leaving = threading.Event()  # this process is ending on purpose: the coordinator may go first
_verdict_wait_s = 0.0  # how long a failed collective waits for the watchdogs to name the dead
_hung = threading.Event()  # this process found the run hung (hang.py): its peers are told so


def stop_process(sentence: str) -> NoReturn:
    """Writes `error: <sentence>` and exits with status 1 at once, from any thread.

    For a thread that finds the run cannot go on while the main thread may be blocked in a
    collective that will never return. Only the first caller writes; later ones wait for exit.
    """
    _one_exit.acquire()  # never released: the process ends under it
    sys.stdout.flush()
    sys.stderr.write(f"error: {sentence}\n")
    sys.stderr.flush()
    os._exit(1)


def announce_hang(grace_s: float = 3.0) -> None:
    """Tells the other processes (through their Watchdogs) that this one found the run hung,
    then waits `grace_s` for them to log their stacks before this process stops."""
    _hung.set()
    _leaving.set()  # a peer that stops first is expected now
    if jax.process_count() > 1:
        time.sleep(grace_s)


def initialize(coordinator_address: str, num_processes: int, process_id: int, **options) -> None:
    """`jax.distributed.initialize` (with `options`), every process but 0 joined through a
    CoordinatorLink, so that process 0's death stops the others with one sentence instead of
    jax's C++ dump."""
    address = coordinator_address
    if process_id != 0:
        address = CoordinatorLink(coordinator_address).address
    jax.distributed.initialize(
        coordinator_address=address, num_processes=num_processes, process_id=process_id, **options
    )
    # Registered after jax's own clean-up, so it runs before it: the service's closing at a
    # normal exit is not taken for a death.
    atexit.register(_leaving.set)


class CoordinatorLink:
    """A byte relay on 127.0.0.1 between jax's client and the coordination service.

    The relay sees the service's side close before jax's client can (the client's side stays
    open), and then stops the process with one sentence naming process 0; once this process is
    leaving anyway (a normal exit, a hang), it says nothing and still keeps the client's side
    open, since jax's client aborts with its dump when that closes. A connection the client
    closes first ends quietly.
    """

    def __init__(self, coordinator: str):
        """Args:
        coordinator: the service's `host:port` (process 0's `mesh.coordinator`).
        """
        host, port = coordinator.rsplit(":", 1)
        self.service = (host.strip("[]"), int(port))
        self.server = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.server.getsockname()[1]}"  # what jax's client dials
        threading.Thread(target=self._accept, name="jaxlm-coordinator-link", daemon=True).start()

    def _accept(self) -> None:
        while True:
            client, _ = self.server.accept()
            try:
                service = socket.create_connection(self.service, timeout=10)
            except OSError:
                client.close()  # the service is not up yet: jax's client dials again
                continue
            service.settimeout(None)
            client_left = threading.Event()
            for source, sink in ((client, service), (service, client)):
                threading.Thread(
                    target=self._pump,
                    args=(source, sink, source is service, client_left),
                    name="jaxlm-coordinator-link",
                    daemon=True,
                ).start()

    def _pump(
        self, source: socket.socket, sink: socket.socket, from_service: bool, client_left
    ) -> None:
        try:
            while data := source.recv(1 << 16):
                sink.sendall(data)
        except OSError:
            pass
        if not from_service:
            client_left.set()
        elif not client_left.is_set():
            if _leaving.is_set():
                return  # this process is ending anyway: its client must not see the close
            stop_process(
                "process 0 (the jax.distributed coordinator) is gone: its connection closed; "
                f"process {jax.process_index()} of {jax.process_count()} stops too. {_RESUME}"
            )
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


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
        global _verdict_wait_s
        self.timeout_s, self.interval_s = timeout_s, interval_s
        _verdict_wait_s = timeout_s + 2 * interval_s
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
        _leaving.set()
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
                mine = _HUNG if _hung.is_set() else str(beat)
                self.client.key_value_set(self._key(self.me), mine, allow_overwrite=True)
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
                if value == _HUNG and not _hung.is_set():
                    faulthandler.dump_traceback(all_threads=True)  # this process's part of it
                    stop_process(
                        f"process {p} found the run hung (see its log); this process's stacks "
                        f"are above; process {self.me} of {self.count} stops too. {_RESUME}"
                    )
                if p not in last_seen or value != last_seen[p][0]:
                    last_seen[p] = (value, now)
                elif now - last_seen[p][1] > self.timeout_s:
                    self._die(f"process {p} sent no heartbeat for {self.timeout_s:.0f} s")

    def _die(self, what: str) -> None:
        stop_process(
            f"{what} and is taken for dead; process {self.me} of {self.count} stops too. {_RESUME}"
        )


# Words of the runtime errors a collective raises when a peer's connection is gone (gloo on
# CPU, NCCL on GPU, the gRPC status of a lost task): anything else (out of memory, a bug) keeps
# its own traceback.
_LOST_PEER_WORDS = ("gloo", "nccl", "connection", "unavailable", "peer", "deadline_exceeded")


def raise_if_peer_lost(error: BaseException) -> None:
    """Raises PeerLost if `error` is a collective failing because another process died.

    A collective fails as soon as a peer's connection closes, without saying which peer: while
    a Watchdog runs, this first waits for it (or the CoordinatorLink) to name the dead process
    and stop this one; PeerLost's vaguer sentence is for when neither does.
    """
    if jax.process_count() == 1 or not isinstance(error, jax.errors.JaxRuntimeError):
        return
    first_line = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    if any(word in first_line.lower() for word in _LOST_PEER_WORDS):
        time.sleep(_verdict_wait_s)
        raise PeerLost(
            f"a collective operation with the other processes failed ({first_line}): a peer "
            f"process has most likely died. {_RESUME}"
        ) from None
