"""Pipe (ext/expserver/_pipe.pyx) on its own, over socketpairs: no loop, no connection.

Covered: the backpressure signal (``is_full``: size >= threshold, or a file segment or a
source still queued); partial writes on a small socket buffer (flush says "again" and
resumes at the byte where it stopped); gathering more items than one sendmsg takes; file
segments sent with sendfile (offset and length honoured, the descriptor closed once sent, by
``clear()`` and when the pipe goes away, unless an OpenFile shares it; a file that shrinks is
an error); iterator sources
(pulled one chunk at a time, chunked framing or raw); a peer that went away; the ``sent``
and ``size`` counters.
"""
from __future__ import annotations

import os
import socket

import pytest

from expserver._pipe import OpenFile, Pipe

DONE, AGAIN, ERROR = 0, 1, -1
SMALL = 4096


# ---------------------------------------------------------------------------- helpers
def socket_pair(buffer: int | None = None) -> tuple[socket.socket, socket.socket]:
    """(writer, reader), both non-blocking; ``buffer`` makes the writer fill up after a
    few KiB."""
    w, r = socket.socketpair()
    if buffer is not None:
        w.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, buffer)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, buffer)
    w.setblocking(False)
    r.setblocking(False)
    return w, r


def drain(sock: socket.socket) -> bytes:
    out = b""
    while True:
        try:
            data = sock.recv(1 << 20)
        except BlockingIOError:
            return out
        if not data:
            return out
        out += data


def flush_all(pipe: Pipe, w: socket.socket, r: socket.socket) -> bytes:
    """Flush until done, reading as the reader would; what the reader got."""
    got = b""
    for _ in range(100000):
        rc = pipe.flush(w.fileno())
        got += drain(r)
        if rc == DONE:
            return got
        assert rc == AGAIN
    raise AssertionError("the pipe never finished")


def pattern(n: int) -> bytes:
    """n bytes where any misplaced run shows (no short period)."""
    return b"".join(b"%08d" % i for i in range(n // 8 + 1))[:n]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.fixture
def pair():
    w, r = socket_pair()
    yield w, r
    w.close()
    r.close()


@pytest.fixture
def small_pair():
    w, r = socket_pair(SMALL)
    yield w, r
    w.close()
    r.close()


@pytest.fixture
def data_file(tmp_path):
    """A 300 KiB file and its content."""
    content = pattern(300 * 1024)
    path = tmp_path / "data.bin"
    path.write_bytes(content)
    return path, content


# ---------------------------------------------------------------------------- thresholds
def test_an_empty_pipe_is_neither_full_nor_busy(pair):
    pipe = Pipe(100)
    assert pipe.is_empty and not pipe.is_full
    assert (pipe.size, pipe.sent, pipe.streams, pipe.threshold) == (0, 0, 0, 100)
    assert pipe.flush(pair[0].fileno()) == DONE


def test_default_threshold_is_64_kib():
    assert Pipe().threshold == 65536


@pytest.mark.parametrize("sizes, full", [
    ((99,), False),
    ((100,), True),
    ((60, 39), False),
    ((60, 40), True),
    ((250,), True),
], ids=["one-under", "one-at", "two-under", "two-at", "one-over"])
def test_full_when_buffered_bytes_reach_the_threshold(sizes, full):
    pipe = Pipe(100)
    for n in sizes:
        pipe.push(b"x" * n)
    assert pipe.size == sum(sizes)
    assert pipe.is_full is full


def test_an_empty_push_queues_nothing():
    pipe = Pipe(100)
    pipe.push(b"")
    assert pipe.is_empty and pipe.size == 0


def test_full_while_a_file_segment_is_queued_then_not(pair, data_file):
    w, r = pair
    path, content = data_file
    pipe = Pipe(1 << 20)
    pipe.push_file(os.open(path, os.O_RDONLY), 0, 10)
    assert pipe.is_full and pipe.size == 0 and pipe.streams == 1
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == content[:10]
    assert not pipe.is_full and pipe.streams == 0


def test_full_while_a_source_is_queued_then_not(pair):
    w, r = pair
    pipe = Pipe(1 << 20)
    pipe.push_source(iter([b"a"]), False)
    assert pipe.is_full and pipe.streams == 1
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == b"a"
    assert not pipe.is_full and pipe.streams == 0 and pipe.is_empty


# ---------------------------------------------------------------------------- partial writes
def test_a_full_socket_says_again_and_resumes_exactly_where_it_stopped(small_pair):
    w, r = small_pair
    data = pattern(256 * 1024)
    pipe = Pipe(1 << 20)
    for i in range(0, len(data), 10000):        # items of 10000 bytes: cuts fall inside them
        pipe.push(data[i:i + 10000])
    got = b""
    rounds = 0
    while True:
        rc = pipe.flush(w.fileno())
        assert pipe.sent + pipe.size == len(data)
        chunk = drain(r)
        # the reader has exactly what the pipe says it sent: nothing lost, nothing twice
        assert got + chunk == data[:pipe.sent]
        got += chunk
        if rc == DONE:
            break
        assert rc == AGAIN
        assert drain(r) == b""      # "again" means the socket took no more
        rounds += 1
    assert got == data
    assert rounds > 5               # the small buffer did cut it into many writes
    assert pipe.is_empty and pipe.size == 0 and pipe.sent == len(data)


def test_flushing_a_full_socket_again_without_reading_writes_nothing(small_pair):
    w, r = small_pair
    pipe = Pipe(1 << 20)
    pipe.push(pattern(100000))
    assert pipe.flush(w.fileno()) == AGAIN
    sent = pipe.sent
    assert pipe.flush(w.fileno()) == AGAIN
    assert pipe.sent == sent and pipe.size == 100000 - sent


# ---------------------------------------------------------------------------- gather
@pytest.mark.parametrize("count", [63, 64, 65, 200, 1000])
def test_many_small_items_go_out_in_order_in_one_flush(pair, count):
    w, r = pair
    pipe = Pipe(1 << 20)
    items = [b"%04d," % i for i in range(count)]
    for item in items:
        pipe.push(item)
    # the socket has room for all of it: one flush is enough, however many sendmsg it takes
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == b"".join(items)
    assert pipe.is_empty and pipe.size == 0 and pipe.sent == 5 * count


def test_many_small_items_through_a_small_buffer_stay_in_order(small_pair):
    w, r = small_pair
    pipe = Pipe(1 << 20)
    items = [b"%05d:" % i + b"y" * (i % 50) for i in range(3000)]
    for item in items:
        pipe.push(item)
    assert flush_all(pipe, w, r) == b"".join(items)


# ---------------------------------------------------------------------------- file segments
def test_a_file_segment_sends_its_offset_and_length_between_bytes(pair, data_file):
    w, r = pair
    path, content = data_file
    fd = os.open(path, os.O_RDONLY)
    pipe = Pipe(1 << 20)
    pipe.push(b"HEAD ")
    pipe.push_file(fd, 1000, 5000)
    pipe.push(b" TAIL")
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == b"HEAD " + content[1000:6000] + b" TAIL"
    assert not is_open(fd)                  # the pipe owned it, and closed it once sent
    assert pipe.sent == 5 + 5000 + 5 and pipe.size == 0


def test_a_whole_file_through_a_small_buffer_arrives_intact(small_pair, data_file):
    w, r = small_pair
    path, content = data_file
    fd = os.open(path, os.O_RDONLY)
    pipe = Pipe(1 << 20)
    pipe.push_file(fd, 0, len(content))
    assert pipe.flush(w.fileno()) == AGAIN
    assert is_open(fd)                      # half sent: still the pipe's
    assert flush_all(pipe, w, r) == content
    assert not is_open(fd)


def test_two_files_in_a_row_each_closed(pair, data_file):
    w, r = pair
    path, content = data_file
    fds = [os.open(path, os.O_RDONLY) for _ in range(2)]
    pipe = Pipe(1 << 20)
    pipe.push_file(fds[0], 0, 10)
    pipe.push_file(fds[1], 10, 10)
    assert pipe.streams == 2
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == content[:20]
    assert not any(is_open(fd) for fd in fds)


def test_clear_closes_a_queued_file_and_forgets_everything(pair, data_file):
    path, _ = data_file
    fd = os.open(path, os.O_RDONLY)
    pipe = Pipe(100)
    pipe.push(b"x" * 150)
    pipe.push_file(fd, 0, 10)
    pipe.push_source(iter([b"a"]), True)
    pipe.clear()
    assert not is_open(fd)
    assert pipe.is_empty and not pipe.is_full
    assert (pipe.size, pipe.streams) == (0, 0)
    assert pipe.flush(pair[0].fileno()) == DONE
    assert drain(pair[1]) == b""


def test_clear_closes_a_half_sent_file(small_pair, data_file):
    w, r = small_pair
    path, content = data_file
    fd = os.open(path, os.O_RDONLY)
    pipe = Pipe(100)
    pipe.push_file(fd, 0, len(content))
    assert pipe.flush(w.fileno()) == AGAIN
    pipe.clear()
    assert not is_open(fd)


def test_a_pipe_that_goes_away_closes_its_file(data_file):
    path, _ = data_file
    fd = os.open(path, os.O_RDONLY)
    pipe = Pipe(100)
    pipe.push_file(fd, 0, 10)
    del pipe
    assert not is_open(fd)


def test_a_shared_descriptor_is_left_to_its_open_file(pair, small_pair, data_file):
    """An OpenFile's descriptor (the static routes' open-file cache) is sent by several
    pipes at once, each from its own offset; none closes it, sent or cleared, and it is
    closed when the OpenFile and the last pipe holding it are gone."""
    path, content = data_file
    shared = OpenFile(os.open(path, os.O_RDONLY))
    fd = shared.fd
    whole, half = Pipe(1 << 20), Pipe(100)
    whole.push_file(fd, 0, 100, shared)
    half.push_file(fd, 50, len(content) - 50, shared)
    assert whole.flush(pair[0].fileno()) == DONE
    assert drain(pair[1]) == content[:100]
    assert half.flush(small_pair[0].fileno()) == AGAIN       # half sent, then dropped
    half.clear()
    assert is_open(fd)
    again = Pipe(1 << 20)
    again.push_file(fd, 10, 20, shared)
    del shared                                  # the cache let go; the pipe still sends it
    assert is_open(fd)
    assert again.flush(pair[0].fileno()) == DONE
    assert drain(pair[1]) == content[10:30]
    assert not is_open(fd)


def test_a_file_that_shrinks_under_the_pipe_is_an_error(pair, tmp_path):
    w, r = pair
    path = tmp_path / "shrinks.bin"
    path.write_bytes(b"z" * 1000)
    fd = os.open(path, os.O_RDONLY)
    pipe = Pipe(100)
    pipe.push_file(fd, 0, 1000)
    os.truncate(path, 100)
    assert pipe.flush(w.fileno()) == ERROR     # the promised length cannot be kept
    assert drain(r) == b"z" * 100
    pipe.clear()
    assert not is_open(fd)


# ---------------------------------------------------------------------------- sources
@pytest.mark.parametrize("chunked, expected", [
    (True, b"2\r\nab\r\n3\r\ncde\r\na\r\n0123456789\r\n0\r\n\r\n"),
    (False, b"abcde0123456789"),
], ids=["chunked", "raw"])
def test_a_source_is_framed_and_its_empty_chunks_skipped(pair, chunked, expected):
    w, r = pair
    pipe = Pipe(100)
    pipe.push(b"<")
    pipe.push_source(iter([b"ab", b"", b"cde", b"", b"", b"0123456789"]), chunked)
    pipe.push(b">")
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == b"<" + expected + b">"
    assert pipe.sent == len(expected) + 2 and pipe.size == 0 and pipe.streams == 0


@pytest.mark.parametrize("chunked, expected", [(True, b"0\r\n\r\n"), (False, b"")],
                         ids=["chunked", "raw"])
def test_an_empty_source_sends_only_its_end(pair, chunked, expected):
    w, r = pair
    pipe = Pipe(100)
    pipe.push_source(iter([]), chunked)
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == expected
    assert pipe.is_empty and pipe.streams == 0


def test_a_source_is_pulled_only_when_it_reaches_the_head_of_the_queue(small_pair):
    w, r = small_pair
    pulled = []

    def source():
        for i in range(3):
            pulled.append(i)
            yield b"%d" % i

    pipe = Pipe(1 << 20)
    pipe.push(pattern(100000))      # more than the socket takes
    pipe.push_source(source(), False)
    assert pipe.flush(w.fileno()) == AGAIN
    assert pulled == []             # still behind bytes that did not go out
    got = flush_all(pipe, w, r)
    assert pulled == [0, 1, 2]
    assert got.endswith(b"012")


def test_a_big_source_through_a_small_buffer_arrives_in_order(small_pair):
    w, r = small_pair
    chunks = [pattern(3000 + i) for i in range(100)]
    pipe = Pipe(1 << 20)
    pipe.push_source(iter(chunks), True)
    expected = b"".join(b"%x\r\n%b\r\n" % (len(c), c) for c in chunks) + b"0\r\n\r\n"
    assert flush_all(pipe, w, r) == expected


def test_an_iterable_that_is_not_an_iterator_is_accepted(pair):
    w, r = pair
    pipe = Pipe(100)
    pipe.push_source([b"x", b"y"], False)
    assert pipe.flush(w.fileno()) == DONE
    assert drain(r) == b"xy"


# ---------------------------------------------------------------------------- errors, counters
def test_a_peer_that_closed_is_an_error(pair):
    w, r = pair
    r.close()
    pipe = Pipe(100)
    pipe.push(b"hello")
    assert pipe.flush(w.fileno()) == ERROR
    assert pipe.sent == 0 and pipe.size == 5


def test_a_peer_that_closed_is_an_error_for_a_file_too(pair, data_file):
    w, r = pair
    path, _ = data_file
    fd = os.open(path, os.O_RDONLY)
    r.close()
    pipe = Pipe(100)
    pipe.push_file(fd, 0, 10)
    assert pipe.flush(w.fileno()) == ERROR
    pipe.clear()
    assert not is_open(fd)


def test_sent_counts_across_flushes_and_size_only_what_waits(pair, data_file):
    w, r = pair
    path, content = data_file
    pipe = Pipe(100)
    pipe.push(b"abc")
    pipe.push(b"defg")
    assert (pipe.size, pipe.sent) == (7, 0)
    assert pipe.flush(w.fileno()) == DONE
    assert (pipe.size, pipe.sent) == (0, 7)
    pipe.push_file(os.open(path, os.O_RDONLY), 0, 50)
    assert pipe.size == 0                   # a file's bytes are not held in user space
    pipe.push_source(iter([b"hi"]), True)
    assert pipe.flush(w.fileno()) == DONE
    assert pipe.sent == 7 + 50 + len(b"2\r\nhi\r\n0\r\n\r\n")
    assert drain(r) == b"abcdefg" + content[:50] + b"2\r\nhi\r\n0\r\n\r\n"


def test_a_source_that_yields_str_raises_type_error(pair):
    pipe = Pipe(100)
    pipe.push_source(iter(["text"]), True)
    with pytest.raises(TypeError):
        pipe.flush(pair[0].fileno())
