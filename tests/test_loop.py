"""The event loop: timers in deadline order, cancellation, deferred calls, signals, readers.

The first tests run the loop on the real clock; the rest on a frozen one (``freeze_time``,
``advance``, ``run_once``): the timer heap's order (deadlines, then arming order),
cancellation leaving the heap, faults of callbacks logged while the loop goes on, signals
acted on by the loop, and the deadlines of real connections moving later and earlier in the
same heap (the rig of tests/rig.py), with no event spent on an idle connection.
"""
import gc
import os
import random
import signal
import time

import pytest

from expserver._loop import Loop
from tests.rig import Rig, open_fds


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
        loop.unwatch_signals()
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


# ------------------------------------------------------------------ on a frozen clock
# The tests below never sleep: the clock moves only by ``advance``, the loop by ``run_once``.
T0 = 1000.0


def frozen_loop() -> Loop:
    loop = Loop()
    loop.freeze_time(T0)
    return loop


def step_to(loop: Loop, when: float) -> None:
    """Move the frozen clock to ``when`` and run one iteration (its due timers)."""
    loop.advance(when - loop.time)
    loop.run_once(0)


def test_frozen_timers_fire_in_deadline_order_each_at_its_time():
    loop = frozen_loop()
    fired = []
    for delay in (3.0, 1.0, 2.5, 2.0, 0.5):
        loop.call_later(delay, lambda d=delay: fired.append((d, loop.time - T0)))
    step_to(loop, T0 + 0.4)
    assert fired == []
    for when in (0.5, 1.0, 2.0, 2.5, 3.0):
        step_to(loop, T0 + when - 0.01)
        assert len(fired) == [0.5, 1.0, 2.0, 2.5, 3.0].index(when)
        step_to(loop, T0 + when)
    assert fired == [(0.5, 0.5), (1.0, 1.0), (2.0, 2.0), (2.5, 2.5), (3.0, 3.0)]
    assert loop.timer_count == 0


def test_timers_due_in_the_same_iteration_fire_in_deadline_order():
    loop = frozen_loop()
    fired = []
    for delay in (5, 3, 4, 1, 2):
        loop.call_later(delay, lambda d=delay: fired.append(d))
    step_to(loop, T0 + 10)
    assert fired == [1, 2, 3, 4, 5]


def test_equal_deadlines_fire_in_arming_order():
    loop = frozen_loop()
    fired = []
    for i in range(50):
        loop.call_later(1.0, lambda i=i: fired.append(i))
    loop.call_later(0.5, lambda: fired.append("first"))
    step_to(loop, T0 + 1.0)
    assert fired == ["first", *range(50)]


def test_a_timer_is_in_the_heap_until_it_fires():
    loop = frozen_loop()
    t = loop.call_later(2.0, lambda: None)
    assert t.in_heap and t.when == T0 + 2.0 and loop.timer_count == 1
    step_to(loop, T0 + 2.0)
    assert not t.in_heap and loop.timer_count == 0


def test_a_cancelled_timer_leaves_the_heap_and_never_fires():
    loop = frozen_loop()
    fired = []
    keep = loop.call_later(2.0, lambda: fired.append("kept"))
    gone = loop.call_later(1.0, lambda: fired.append("cancelled"))
    assert loop.timer_count == 2
    gone.cancel()
    assert loop.timer_count == 1
    assert not gone.in_heap and keep.in_heap
    gone.cancel()                               # twice is harmless
    assert loop.timer_count == 1
    step_to(loop, T0 + 5)
    assert fired == ["kept"]


def test_ten_thousand_timers_armed_and_cancelled_leave_the_heap_empty():
    loop = frozen_loop()
    fired = []
    rng = random.Random(7)
    timers = [loop.call_later(rng.uniform(0.1, 100), lambda: fired.append(1))
              for _ in range(10000)]
    assert loop.timer_count == 10000
    rng.shuffle(timers)
    for t in timers:
        t.cancel()
    assert loop.timer_count == 0
    assert not any(t.in_heap for t in timers)
    after = loop.call_later(1.0, lambda: fired.append("after"))   # the heap still works
    step_to(loop, T0 + 200)
    assert fired == ["after"] and not after.in_heap


def test_the_timers_left_after_random_cancellations_fire_in_order():
    loop = frozen_loop()
    rng = random.Random(11)
    fired = []
    timers = []
    for i in range(3000):
        delay = rng.choice([1.0, 2.0, 3.0]) if i % 3 else rng.uniform(0.1, 50)
        timers.append((delay, i, loop.call_later(delay, lambda i=i: fired.append(i))))
    cancelled = set(rng.sample(range(3000), 1500))
    for _, i, t in timers:
        if i in cancelled:
            t.cancel()
    assert loop.timer_count == 1500
    step_to(loop, T0 + 100)
    # by deadline, and equal deadlines in arming order
    assert fired == [i for _, i, _ in sorted(timers) if i not in cancelled]
    assert loop.timer_count == 0


def test_a_timer_armed_by_a_timer_callback_fires_at_its_own_deadline():
    loop = frozen_loop()
    fired = []
    loop.call_later(1.0, lambda: loop.call_later(1.0, lambda: fired.append(loop.time - T0)))
    step_to(loop, T0 + 1.0)
    assert fired == [] and loop.timer_count == 1
    step_to(loop, T0 + 1.5)
    assert fired == []
    step_to(loop, T0 + 2.0)
    assert fired == [1.0 + 1.0]


def test_a_timer_cancelled_by_an_earlier_one_in_the_same_batch_does_not_fire():
    loop = frozen_loop()
    fired = []
    later = loop.call_later(2.0, lambda: fired.append("later"))
    loop.call_later(1.0, later.cancel)
    step_to(loop, T0 + 3.0)
    assert fired == [] and loop.timer_count == 0


def test_a_raising_timer_callback_is_logged_and_the_loop_goes_on(capsys):
    loop = frozen_loop()
    fired = []

    def boom():
        raise RuntimeError("timer went boom")

    loop.call_later(1.0, boom)
    loop.call_later(1.0, lambda: fired.append("same batch"))
    loop.call_later(2.0, lambda: fired.append("next batch"))
    step_to(loop, T0 + 1.0)
    step_to(loop, T0 + 2.0)
    assert fired == ["same batch", "next batch"]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "[error]" in line]
    assert len(lines) == 1
    assert "timer callback" in lines[0] and "RuntimeError: timer went boom" in lines[0]
    assert "Traceback" not in err


def test_a_raising_deferred_callback_is_logged_and_the_next_runs(capsys):
    loop = frozen_loop()
    seen = []
    loop.call_soon(lambda: 1 / 0)
    loop.call_soon(lambda: seen.append("next"))
    loop.run_once(0)
    assert seen == ["next"]
    err = capsys.readouterr().err
    assert err.count("[error]") == 1 and "ZeroDivisionError" in err and "Traceback" not in err


def test_a_signal_is_queued_and_handled_by_the_loop_not_by_the_signal_handler(capsys):
    loop = frozen_loop()
    got = []
    old = signal.getsignal(signal.SIGUSR2)
    try:
        loop.watch_signals([signal.SIGUSR2], lambda signum: got.append(signum))
        os.kill(os.getpid(), signal.SIGUSR2)
        assert got == []                    # only queued so far
        loop.run_once(0)
        assert got == [signal.SIGUSR2]
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        loop.run_once(0)
        assert got == [signal.SIGUSR2] * 3  # one call per signal received
        dispatched = loop.dispatched
        for _ in range(20):
            loop.run_once(0)
        assert loop.dispatched == dispatched    # the wake-up pipe was drained
    finally:
        loop.unwatch_signals()
        signal.signal(signal.SIGUSR2, old)


def test_a_raising_signal_handler_is_logged_and_the_loop_goes_on(capsys):
    loop = frozen_loop()
    old = signal.getsignal(signal.SIGUSR2)
    fired = []

    def on_signal(signum):
        raise ValueError("bad signal handler")

    try:
        loop.watch_signals([signal.SIGUSR2], on_signal)
        loop.call_later(1.0, lambda: fired.append("timer"))
        os.kill(os.getpid(), signal.SIGUSR2)
        loop.run_once(0)
        step_to(loop, T0 + 1.0)
    finally:
        loop.unwatch_signals()
        signal.signal(signal.SIGUSR2, old)
    assert fired == ["timer"]
    err = capsys.readouterr().err
    assert err.count("[error]") == 1 and f"handling signal {int(signal.SIGUSR2)}" in err
    assert "Traceback" not in err


def test_a_raising_reader_callback_is_logged_and_the_loop_goes_on(capsys):
    loop = frozen_loop()
    r, w = os.pipe()
    calls = []

    def on_read():
        calls.append(os.read(r, 100))
        raise OSError("reader broke")

    loop.add_reader(r, on_read)
    os.write(w, b"a")
    loop.run_once(0)
    os.write(w, b"b")
    loop.run_once(0)
    os.close(r)
    os.close(w)
    assert calls == [b"a", b"b"]               # still watched after its fault
    err = capsys.readouterr().err
    assert err.count("[error]") == 2 and "reader callback" in err and "Traceback" not in err


# ------------------------------------------------------------------ a loop that is dropped
def live_loops() -> int:
    gc.collect()
    return sum(type(o) is Loop for o in gc.get_objects())


def test_a_loop_dropped_with_deadlines_pending_is_freed_with_its_epoll_descriptor():
    """The timer heap's references are the GC's to see: a loop (its timers, its connections)
    dropped while deadlines are pending is collected, not kept for good."""
    loops, before = live_loops(), open_fds()
    loop = frozen_loop()
    loop.call_later(10.0, lambda: None)
    loop.call_later(20.0, lambda: None).cancel()
    assert loop.timer_count == 1
    del loop
    assert live_loops() == loops
    assert open_fds() == before


def test_a_rig_dropped_with_an_idle_connection_is_freed_with_its_descriptors():
    loops, before = live_loops(), open_fds()
    rig = Rig(lambda req: (200, b"", b"ok"))
    client, conn = rig.connect()
    client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    client.take()
    assert conn.in_heap                 # its keep-alive deadline
    rig.close()
    rig.loop.call_later(5.0, lambda: None)
    del rig, client, conn
    assert live_loops() == loops
    assert open_fds() == before


def test_unwatching_signals_closes_the_wakeup_pipe_and_puts_the_wakeup_fd_back():
    old = signal.getsignal(signal.SIGUSR2)
    loop = frozen_loop()
    before = open_fds()
    try:
        loop.watch_signals([signal.SIGUSR2], lambda signum: None)
        loop.watch_signals([signal.SIGUSR2], lambda signum: None)     # again: one pipe
        assert len(open_fds() - before) == 2
        loop.unwatch_signals()
        assert open_fds() == before
        assert signal.set_wakeup_fd(-1) == -1
        loop.unwatch_signals()                                      # nothing left to do
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR2, old)


def test_a_loop_dropped_while_watching_signals_closes_its_wakeup_pipe():
    old = signal.getsignal(signal.SIGUSR2)
    loops, before = live_loops(), open_fds()
    try:
        loop = frozen_loop()
        loop.watch_signals([signal.SIGUSR2], lambda signum: None)
        del loop
        assert live_loops() == loops
        assert open_fds() == before
        assert signal.set_wakeup_fd(-1) == -1     # never a write to a descriptor reused since
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR2, old)


def test_closing_a_loop_releases_its_descriptors_while_it_is_still_referenced():
    old = signal.getsignal(signal.SIGUSR2)
    before = open_fds()
    try:
        loop = frozen_loop()
        loop.watch_signals([signal.SIGUSR2], lambda signum: None)
        loop.call_later(1.0, lambda: None)
        loop.close()
        assert open_fds() == before
        assert signal.set_wakeup_fd(-1) == -1
        loop.close()                                # again: nothing to do
        with pytest.raises(OSError):
            loop.run_once(0)                        # a closed loop does not run
    finally:
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGUSR2, old)


# ------------------------------------------------------ deadlines of real handles (the rig)
# A connection's deadline moves with its state: later with every keep-alive request (a
# field write; re-keyed when the stale key comes due), earlier when a head starts.
def test_a_deadline_moved_later_fires_at_the_later_time_only_once():
    rig = Rig(lambda req: (200, b"", b"ok"), keepalive_timeout=75.0, header_timeout=10.0)
    try:
        client, conn = rig.connect()
        count = rig.loop.timer_count
        rig.advance(70)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        client.take()
        assert conn.when == T0 + 70 + 75
        assert rig.loop.timer_count == count    # moved, not added
        rig.advance(5.5)                        # the stale key (T0 + 75) comes due: re-keyed
        assert conn.state_name == "IDLE" and conn.in_heap
        assert rig.loop.timer_count == count
        rig.advance(69.4)                       # T0 + 144.9
        assert conn.state_name == "IDLE"
        rig.advance(0.2)                        # T0 + 145.1
        assert conn.state_name == "CLOSED" and not conn.in_heap
        assert rig.core.stats.conn_timeout == 1
        rig.advance(200)
        assert rig.core.stats.conn_timeout == 1  # fired once
        assert client.closed()
    finally:
        rig.close()


def test_a_deadline_moved_earlier_fires_early():
    rig = Rig(lambda req: (200, b"", b"ok"), keepalive_timeout=75.0, header_timeout=10.0)
    try:
        client, conn = rig.connect()
        rig.advance(30)
        client.send(b"GET / HT")                # a head starts: its deadline is earlier
        assert conn.when == T0 + 30 + 10
        rig.advance(9.9)
        assert conn.state_name == "HEAD"
        rig.advance(0.2)
        assert conn.state_name == "LINGER"      # answered 408 at T0 + 40, not T0 + 75
        assert client.take().startswith(b"HTTP/1.1 408 ")
    finally:
        rig.close()


def test_timers_and_connection_deadlines_share_one_heap_in_order():
    rig = Rig(lambda req: (200, b"", b"ok"), keepalive_timeout=75.0)
    try:
        events = []
        client, conn = rig.connect()
        rig.loop.call_later(50, lambda: events.append(("timer", conn.state_name)))
        rig.loop.call_later(100, lambda: events.append(("timer", conn.state_name)))
        rig.advance(60)
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")   # keep-alive now ends at T0 + 135
        rig.advance(50)
        rig.advance(30)
        assert events == [("timer", "IDLE"), ("timer", "IDLE")]
        assert conn.state_name == "CLOSED"
    finally:
        rig.close()


def test_an_idle_connection_costs_no_events():
    rig = Rig(lambda req: (200, b"", b"ok"))
    try:
        client, conn = rig.connect()
        client.send(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        client.take()
        dispatched = rig.loop.dispatched
        for _ in range(50):
            rig.loop.run_once(0)
        assert rig.loop.dispatched == dispatched
        assert conn.state_name == "IDLE"
    finally:
        rig.close()
