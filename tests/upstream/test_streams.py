"""app.upstream.streams: finding callers that hung up, among any number of open sockets."""
from __future__ import annotations

import os
import resource
import socket

import pytest

from app.upstream.streams import hung_up


@pytest.fixture()
def pairs():
    made = []

    def make():
        a, b = socket.socketpair()
        made.extend((a, b))
        return a, b

    yield make
    for s in made:
        s.close()


def test_only_closed_peers_count_as_gone(pairs):
    closed, closed_peer = pairs()
    talking, talking_peer = pairs()
    idle, _ = pairs()
    closed_peer.close()
    talking_peer.sendall(b"GET /next HTTP/1.1\r\n")      # a client sending early is not a hang-up
    assert hung_up([closed, talking, idle]) == [closed]
    assert talking.recv(100) == b"GET /next HTTP/1.1\r\n"  # the peek left the data in place


def test_a_reset_or_closed_socket_counts_as_gone(pairs):
    reset, peer = pairs()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    peer.close()
    mine, _ = pairs()
    mine.close()                                        # fileno() is -1 now
    assert set(map(id, hung_up([reset, mine]))) == {id(reset), id(mine)}


def test_descriptors_above_1024(pairs):
    """select() cannot watch a descriptor >= 1024 (FD_SETSIZE); a busy worker has thousands."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 2100:
        pytest.skip(f"the hard limit on open files ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 2100), hard))
    try:
        a, b = pairs()
        c, d = pairs()
        high_a = socket.socket(fileno=os.dup2(a.fileno(), 2000))
        high_c = socket.socket(fileno=os.dup2(c.fileno(), 2001))
        a.close()
        c.close()
        b.close()
        try:
            assert hung_up([high_a, high_c]) == [high_a]
        finally:
            high_a.close()
            high_c.close()
            d.close()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
