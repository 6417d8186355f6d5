"""The event loop: timers in deadline order, cancellation, deferred calls, signals, readers."""
import os
import signal
import time

import pytest

from expserver._loop import Loop


def test_timers_fire_in_deadline_order_then_stop():
    loop = Loop()
    fired = []
    loop.call_later(0.03, lambda: fired.append("c"))
    loop.call_later(0.01, lambda: fired.append("a"))
    loop.call_later(0.02, lambda: fired.append("b"))
    loop.call_later(0.05, loop.stop)
    t0 = time.monotonic()
    loop.run()
    assert fired == ["a", "b", "c"]
    assert 0.04 <= time.monotonic() - t0 < 1.0


def test_cancelled_timer_never_fires():
    loop = Loop()
    fired = []
    t = loop.call_later(0.01, lambda: fired.append("x"))
    t.cancel()
    loop.call_later(0.03, loop.stop)
    loop.run()
    assert fired == []


def test_call_soon_runs_on_the_next_iteration_in_order():
    loop = Loop()
    seen = []
    loop.call_soon(lambda: seen.append(1))
    loop.call_soon(lambda: seen.append(2))
    loop.call_soon(loop.stop)
    loop.run()
    assert seen == [1, 2]


def test_a_failing_callback_does_not_stop_the_loop(capsys):
    loop = Loop()
    seen = []

    def boom():
        raise RuntimeError("boom")

    loop.call_soon(boom)
    loop.call_later(0.01, lambda: seen.append("after"))
    loop.call_later(0.02, loop.stop)
    loop.run()
    assert seen == ["after"]
    assert "boom" in capsys.readouterr().err


def test_reader_is_called_when_its_fd_is_readable():
    loop = Loop()
    r, w = os.pipe()
    got = []

    def on_read():
        got.append(os.read(r, 100))
        loop.stop()

    loop.add_reader(r, on_read)
    loop.call_later(0.01, lambda: os.write(w, b"ping"))
    loop.call_later(2.0, loop.stop)       # safety net
    loop.run()
    os.close(r)
    os.close(w)
    assert got == [b"ping"]


def test_signal_reaches_the_handler_through_the_loop():
    loop = Loop()
    got = []
    old = signal.getsignal(signal.SIGUSR2)
    try:
        loop.watch_signals([signal.SIGUSR2], lambda signum: (got.append(signum), loop.stop()))
        loop.call_later(0.01, lambda: os.kill(os.getpid(), signal.SIGUSR2))
        loop.call_later(2.0, loop.stop)
        loop.run()
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR2, old)
    assert got == [signal.SIGUSR2]


@pytest.mark.parametrize("n", [1000])
def test_many_timers_fire_once_each(n):
    loop = Loop()
    fired = []
    for i in range(n):
        loop.call_later(0.001 * (i % 10), lambda i=i: fired.append(i))
    loop.call_later(0.05, loop.stop)
    loop.run()
    assert sorted(fired) == list(range(n))
