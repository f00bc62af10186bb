"""The forge's and the bench's stop: a grace period for the job in hand, then at once."""

import logging
import os
import signal
import threading
import time

from pipelines.stopping import GracefulStop

log = logging.getLogger("esper.test")


def test_first_request_gives_the_job_its_grace_period_and_a_second_ends_it():
    stop = GracefulStop(60.0, log=log, job="job")
    assert not stop.requested and not stop.job_must_stop()
    stop.request()
    assert stop.requested
    assert not stop.job_must_stop()  # within the 60 s grace period
    stop.request()
    assert stop.job_must_stop()


def test_the_job_must_stop_once_the_grace_period_is_over():
    stop = GracefulStop(0.05, log=log, job="job")
    stop.request()
    assert not stop.job_must_stop()
    time.sleep(0.1)
    assert stop.job_must_stop()


def test_sigterm_inside_requests_the_stop_and_the_old_handler_comes_back():
    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *_: seen.append("outer"))
    try:
        stop = GracefulStop(60.0, log=log, job="job")
        with stop.on_signals():
            os.kill(os.getpid(), signal.SIGTERM)
            assert stop.requested and seen == []
        os.kill(os.getpid(), signal.SIGTERM)
        assert seen == ["outer"]
    finally:
        signal.signal(signal.SIGTERM, previous)


def test_off_the_main_thread_no_handler_is_set():
    before = signal.getsignal(signal.SIGINT)
    during = []

    def worker():
        with GracefulStop(1.0, log=log, job="job").on_signals():
            during.append(signal.getsignal(signal.SIGINT))

    thread = threading.Thread(target=worker)
    thread.start()
    thread.join()
    assert during == [before]
