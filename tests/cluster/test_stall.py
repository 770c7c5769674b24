"""cluster.stall: work that waits on resources is reported on the terminal, with the numbers."""

from __future__ import annotations

import logging
import threading
import time

from cluster.stall import stall_watch


def test_work_pending_on_resources_is_reported(ray_local, caplog):
    @ray_local.remote(num_cpus=64)  # more than the session's Ray has: it stays pending
    class Greedy:
        def ping(self):
            return 1

    actor = Greedy.remote()
    try:
        with caplog.at_level(logging.WARNING, logger="cluster.stall"):
            with stall_watch("train", after_s=1.0, every_s=0.5):
                deadline = time.monotonic() + 60
                while not caplog.records and time.monotonic() < deadline:
                    time.sleep(0.5)
        # the watcher is out of Ray when the block ends: the caller may shut Ray down next
        assert not [t for t in threading.enumerate() if t.name.startswith("stall-watch")]
        text = caplog.records[0].getMessage()
        assert text.startswith("train: 1 actor(s) waiting for resources for ")
        assert "'CPU', 64.0" in text or "'CPU': 64.0" in text
        assert "the cluster has CPU" in text and "in use" in text
    finally:
        ray_local.kill(actor)
