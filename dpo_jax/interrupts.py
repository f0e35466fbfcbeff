"""SIGTERM and Ctrl-C as requests the run honours at safe points.

Schedulers (SLURM, Kubernetes, preemptible TPU and GPU VMs) send SIGTERM some seconds before
they kill a job: ``Interrupts`` turns it into a flag the training loop reads after each step; it
then saves a checkpoint of the current step, waits for the save to complete and stops, so a
requeued job resumes where this one stopped. During setup (nothing trained yet) it stops at the
next phase boundary.

Ctrl-C (SIGINT) raises KeyboardInterrupt as usual, and also sets a flag: CPython swallows an
exception raised while a garbage-collection callback runs (JAX installs one), so the flag is
checked at the same safe points and a swallowed Ctrl-C still stops the run. The trainer then
finishes the save in flight and names the last complete checkpoint.
"""

from __future__ import annotations

import logging
import signal
import threading

log = logging.getLogger(__name__)


class Interrupts:
    """Installs the SIGTERM and SIGINT handlers (main thread only; elsewhere both flags stay
    False); ``restore()`` puts the previous handlers back."""

    def __init__(self):
        self.terminate = False   # SIGTERM: save the current step, then stop
        self.interrupt = False   # Ctrl-C: stop
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig, handler in ((signal.SIGTERM, self._on_term), (signal.SIGINT, self._on_int)):
                self._previous[sig] = signal.signal(sig, handler)

    def _on_term(self, signum, frame):
        if not self.terminate:
            log.warning("SIGTERM: stopping at the end of the current step, after saving it")
        self.terminate = True

    def _on_int(self, signum, frame):
        self.interrupt = True
        raise KeyboardInterrupt

    def check_interrupt(self):
        """Re-raises a Ctrl-C that a library swallowed."""
        if self.interrupt:
            raise KeyboardInterrupt

    def restore(self):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
