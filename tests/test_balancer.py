"""expserver.balancer: which upstream gets each attempt, and when a peer is out or back."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from expserver.balancer import Balancer, HealthChecker, Peer
from expserver.config import LB_METHODS, HealthCheckConfig, RouteConfig, UpstreamConfig, parse

ROOT = Path(__file__).resolve().parents[1]


def up(host: str, weight: int = 1, **params: object) -> UpstreamConfig:
    return UpstreamConfig(host, 8080, weight, **params)  # type: ignore[arg-type]


def hosts(balancer: Balancer, count: int, ip: str = "10.0.0.1", now: float = 0.0) -> str:
    """The hosts of ``count`` successive picks, as one string of one-letter names."""
    picked = []
    for _ in range(count):
        peer = balancer.pick(ip, now)
        picked.append(peer.host if peer else "-")
    return "".join(picked)


def random_ips(count: int, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    return [".".join(str(rng.randrange(256)) for _ in range(4)) for _ in range(count)]


def shares(balancer: Balancer, picks: int = 10_000) -> dict[str, float]:
    counts = Counter(balancer.pick(ip, 0.0).host for ip in random_ips(picks))  # type: ignore[union-attr]
    return {host: n / picks for host, n in sorted(counts.items())}


def expected_shares(weights: dict[str, int]) -> dict[str, float]:
    total = sum(weights.values())
    return {host: w / total for host, w in sorted(weights.items())}


WEIGHTS = {"a": 1, "b": 2, "c": 3, "d": 4}


def weighted(method: str, seed: int = 1) -> Balancer:
    upstreams = [up(h, w) for h, w in WEIGHTS.items()]
    return Balancer(upstreams, method, rng=random.Random(seed))


# --- smooth weighted round-robin ----------------------------------------------------------------


def test_smooth_weighted_round_robin_is_nginx_order() -> None:
    balancer = Balancer([up("a", 5), up("b"), up("c")])
    # ngx_http_upstream_round_robin.c: the 5-weight peer's turns are spread out, not bunched.
    assert hosts(balancer, 14) == "aabacaa" * 2


def test_round_robin_equal_weights_take_turns() -> None:
    assert hosts(Balancer([up("a"), up("b"), up("c")]), 7) == "abcabca"


@pytest.mark.parametrize("method", LB_METHODS)
def test_shares_follow_weights(method: str) -> None:
    got = shares(weighted(method))
    for host, want in expected_shares(WEIGHTS).items():
        # ip_hash's shares are those of the ring (fixed by the addresses), not of sampling.
        tolerance = 0.15 * want if method == "ip_hash" else 0.02
        assert abs(got[host] - want) <= tolerance, (host, got)


def test_round_robin_shares_are_exact_over_a_cycle() -> None:
    counts = Counter(hosts(weighted("round_robin"), 10_000))
    assert counts == {"a": 1000, "b": 2000, "c": 3000, "d": 4000}


# --- exclusion (retries) and backups -------------------------------------------------------------


def test_retries_walk_every_peer_once_then_none() -> None:
    balancer = Balancer([up("a"), up("b"), up("c")])
    tried: set[Peer] = set()
    order = []
    while (peer := balancer.pick("10.0.0.1", 0.0, exclude=tried)) is not None:
        order.append(peer.host)
        tried.add(peer)
    assert order == ["a", "b", "c"]
    assert balancer.tries == 3  # default retries: every other upstream once


def test_exclusion_does_not_disturb_the_rotation() -> None:
    balancer = Balancer([up("a"), up("b"), up("c")])
    a = balancer.peers[0]
    assert balancer.pick("ip", 0.0, exclude={a}).host == "b"  # type: ignore[union-attr]
    assert hosts(balancer, 3) == "cab"


def test_tries_follows_the_retries_key() -> None:
    route = (
        parse(
            {
                "servers": [
                    {
                        "listeners": [{"host": "h", "port": 1}],
                        "routes": [
                            {
                                "req_path": "/",
                                "type": "reverse_proxy",
                                "upstreams": ["a:1", "b:1", "c:1"],
                                "retries": 1,
                                "lb_method": "least_conn",
                            }
                        ],
                    }
                ]
            },
            "/",
        )
        .servers[0]
        .routes[0]
    )
    balancer = Balancer.from_route(route)
    assert (balancer.tries, balancer.lb_method) == (2, "least_conn")
    assert [p.address for p in balancer.peers] == ["a:1", "b:1", "c:1"]
    assert Balancer(route.upstreams, retries=0).tries == 1


def test_backups_serve_only_when_no_primary_is_available() -> None:
    balancer = Balancer([up("a"), up("b"), up("x", backup=True), up("y", backup=True)])
    a, b, x, _ = balancer.peers
    assert hosts(balancer, 4) == "abab"
    # A retry that has tried every primary goes to a backup.
    assert balancer.pick("ip", 0.0, exclude={a, b}) is x
    a.healthy = False
    assert hosts(balancer, 2) == "bb"  # one primary left: no backup yet
    b.failed(0.0)
    assert sorted(hosts(balancer, 4, now=1.0)) == ["x", "x", "y", "y"]
    a.healthy = True
    assert hosts(balancer, 2, now=1.0) == "aa"  # the primary is back: backups idle again


def test_all_down_is_none_then_peers_are_retried() -> None:
    balancer = Balancer([up("a"), up("b")])
    a, b = balancer.peers
    a.failed(0.0)
    b.failed(0.0)
    assert not a.available(1.0) and not b.available(1.0)
    assert balancer.pick("ip", 1.0) is None  # the caller answers 502
    # nginx's quick recovery: the next request tries the peers instead of 502s for 10 s.
    assert balancer.pick("ip", 1.0) is not None


def test_a_request_that_tried_every_peer_does_not_reset_them() -> None:
    balancer = Balancer([up("a"), up("b")])
    a, b = balancer.peers
    a.failed(0.0)
    b.failed(0.0)
    assert balancer.pick("ip", 1.0, exclude={a, b}) is None
    assert not a.available(1.0) and not b.available(1.0)


def test_unhealthy_everywhere_stays_none() -> None:
    balancer = Balancer([up("a"), up("b")])
    for peer in balancer.peers:
        peer.healthy = False
    assert hosts(balancer, 3) == "---"  # forgetting passive failures does not undo checks


# --- passive health: max_fails / fail_timeout ------------------------------------------------


def test_max_fails_within_fail_timeout_mark_down_until_it_passes() -> None:
    balancer = Balancer([up("a", max_fails=2, fail_timeout=10.0), up("b")])
    a = balancer.peers[0]
    a.failed(0.0)
    assert a.available(1.0)  # one failure of two
    a.failed(5.0)
    assert (a.available(5.0), a.available(14.9), a.available(15.0)) == (False, False, True)
    assert a.down_until == 15.0
    assert hosts(balancer, 3, now=6.0) == "bbb"


def test_failures_further_apart_than_fail_timeout_do_not_add_up() -> None:
    peer = Peer("a", 1, max_fails=2, fail_timeout=10.0)
    peer.failed(0.0)
    peer.failed(10.5)  # the first is too old to count
    assert peer.available(10.5) and peer.fails == 1
    peer.failed(20.0)
    assert not peer.available(20.0)


def test_successes_between_failures_do_not_reset_the_count() -> None:
    peer = Peer("a", 1, max_fails=2, fail_timeout=10.0)
    peer.failed(0.0)
    peer.succeeded()
    peer.failed(1.0)
    assert not peer.available(1.0)  # a peer failing every other request is taken out


def test_after_a_down_period_one_request_is_the_trial() -> None:
    balancer = Balancer([up("a"), up("b")])
    a, b = balancer.peers
    a.failed(0.0)  # max_fails 1: down until 10
    assert hosts(balancer, 2, now=5.0) == "bb"
    # At 10 a gets one request; the others skip it while that one is out.
    assert sorted(hosts(balancer, 2, now=10.0)) == ["a", "b"]
    assert hosts(balancer, 3, now=10.0) == "bbb"
    assert not a.available(10.1)
    a.failed(10.2)  # the trial failed: down for another fail_timeout
    assert not a.available(20.1) and a.available(20.2)
    assert balancer.pick("ip", 20.2, exclude={b}) is a
    a.succeeded()  # the trial worked: back for good
    assert a.available(20.3) and a.fails == 0
    assert sorted(hosts(balancer, 4, now=20.3)) == ["a", "a", "b", "b"]


def test_a_failed_trial_takes_the_peer_out_at_once() -> None:
    # The failures that took it out are older than fail_timeout by now, but they still count:
    # one more failure, not max_fails more, ends the trial (nginx).
    balancer = Balancer([up("a", max_fails=3), up("b")])
    a = balancer.peers[0]
    for t in (0.0, 1.0, 2.0):
        a.failed(t)
    assert not a.available(11.9) and a.available(12.0)
    assert balancer.pick("ip", 12.5, exclude={balancer.peers[1]}) is a
    a.failed(13.0)
    assert not a.available(13.0) and a.down_until == 23.0


def test_success_of_an_old_request_does_not_end_a_down_period() -> None:
    peer = Peer("a", 1, max_fails=1, fail_timeout=10.0)
    peer.failed(0.0)
    peer.succeeded()  # started before the failure, finished after it: no trial yet
    assert not peer.available(5.0)


def test_max_fails_zero_never_marks_down() -> None:
    peer = Peer("a", 1, max_fails=0)
    for t in range(100):
        peer.failed(float(t))
    assert peer.available(100.0) and peer.effective_weight == 1


def test_a_single_upstream_is_never_marked_down() -> None:
    balancer = Balancer([up("a", max_fails=1)])
    (a,) = balancer.peers
    a.failed(0.0)
    assert a.available(0.0)
    assert balancer.pick("ip", 0.0) is a


@pytest.mark.parametrize("method", LB_METHODS)
def test_a_single_upstream_is_picked_unless_unhealthy_or_tried(method: str) -> None:
    balancer = Balancer([up("a", 3)], method)
    (a,) = balancer.peers
    assert [balancer.pick(ip, 0.0) for ip in random_ips(5)] == [a] * 5
    assert balancer.pick("ip", 0.0, exclude={a}) is None       # this request already tried it
    a.healthy = False
    assert balancer.pick("ip", 0.0) is None                    # its health check says no
    a.healthy = True
    assert balancer.pick("ip", 1.0) is a


def test_failed_peer_earns_its_weight_back_gradually() -> None:
    balancer = Balancer([up("a", 5, max_fails=5), up("b", 5, max_fails=5)])
    a, _ = balancer.peers
    a.failed(0.0)  # nginx: effective weight drops by weight / max_fails
    assert a.effective_weight == 4
    hosts(balancer, 1)
    assert a.effective_weight == 5


# --- least_conn and random_two -------------------------------------------------------------------


def test_least_conn_takes_the_least_busy() -> None:
    balancer = Balancer([up("a"), up("b"), up("c")], "least_conn")
    a, b, c = balancer.peers
    a.active, b.active, c.active = 3, 1, 2
    assert hosts(balancer, 3) == "bbb"
    b.active = 5
    assert hosts(balancer, 2) == "cc"


def test_least_conn_counts_per_unit_of_weight() -> None:
    balancer = Balancer([up("a", 1), up("b", 3)], "least_conn")
    a, b = balancer.peers
    a.active, b.active = 1, 2  # 1/1 against 2/3
    assert hosts(balancer, 1) == "b"
    b.active = 4  # 4/3 against 1/1
    assert hosts(balancer, 1) == "a"


def test_least_conn_ties_rotate_by_weight() -> None:
    balancer = Balancer([up("a", 5), up("b"), up("c"), up("d")], "least_conn")
    balancer.peers[3].active = 1  # d is busier: out of the tie
    assert hosts(balancer, 7) == "aabacaa"


def test_least_conn_follows_connections_as_they_come_and_go() -> None:
    balancer = Balancer([up("a"), up("b")], "least_conn")
    held = [balancer.pick("ip", 0.0) for _ in range(4)]
    for peer in held:
        peer.active += 1  # type: ignore[union-attr]
    assert Counter(p.host for p in held) == {"a": 2, "b": 2}  # type: ignore[union-attr]
    balancer.peers[0].active -= 2
    assert hosts(balancer, 1) == "a"


def test_random_two_never_picks_the_busiest_of_three() -> None:
    balancer = Balancer([up("a"), up("b"), up("c")], "random_two", rng=random.Random(3))
    a, b, c = balancer.peers
    a.active, b.active, c.active = 0, 5, 10
    counts = Counter(hosts(balancer, 3000))
    # c loses every pair it is drawn in; a wins both of its pairs, b one of its two.
    assert "c" not in counts
    assert abs(counts["a"] / 3000 - 2 / 3) < 0.03


def test_random_two_with_two_peers_always_takes_the_idle_one() -> None:
    balancer = Balancer([up("a"), up("b")], "random_two", rng=random.Random(4))
    balancer.peers[0].active = 1
    assert hosts(balancer, 50) == "b" * 50


def test_random_two_with_one_available_peer() -> None:
    balancer = Balancer([up("a"), up("b")], "random_two", rng=random.Random(5))
    balancer.peers[0].healthy = False
    assert hosts(balancer, 5) == "bbbbb"


# --- ip_hash: consistent hashing -----------------------------------------------------------------


def ip_hash(names: list[str], weights: dict[str, int] | None = None) -> Balancer:
    weights = weights or {}
    return Balancer([up(n, weights.get(n, 1)) for n in names], "ip_hash")


def mapping(balancer: Balancer, ips: list[str]) -> list[str]:
    return [balancer.pick(ip, 0.0).host for ip in ips]  # type: ignore[union-attr]


def test_ip_hash_keeps_a_client_on_one_peer() -> None:
    ips = random_ips(1000)
    balancer = ip_hash(["a", "b", "c"])
    first = mapping(balancer, ips)
    assert mapping(balancer, ips) == first
    assert mapping(ip_hash(["a", "b", "c"]), ips) == first  # another worker agrees
    assert mapping(ip_hash(["c", "a", "b"]), ips) == first  # the order of the list is irrelevant
    assert set(first) == {"a", "b", "c"}


def test_adding_a_peer_moves_about_one_client_in_n() -> None:
    ips = random_ips(10_000)
    before = mapping(ip_hash(["a", "b", "c", "d"]), ips)
    after = mapping(ip_hash(["a", "b", "c", "d", "e"]), ips)
    moved = [(old, new) for old, new in zip(before, after) if old != new]
    assert all(new == "e" for _, new in moved)  # nobody moves between the old peers
    assert 0.15 <= len(moved) / len(ips) <= 0.25  # ~1/5 (a modulo hash would move ~4/5)


def test_a_down_peer_moves_only_its_own_clients() -> None:
    ips = random_ips(10_000)
    balancer = ip_hash(["a", "b", "c", "d"])
    before = mapping(balancer, ips)
    balancer.peers[1].healthy = False
    after = mapping(balancer, ips)
    for old, new in zip(before, after):
        assert new == old if old != "b" else new != "b"
    assert set(after) == {"a", "c", "d"}
    balancer.peers[1].healthy = True
    assert mapping(balancer, ips) == before  # and they come back to it


def test_ip_hash_retry_goes_to_another_peer() -> None:
    balancer = ip_hash(["a", "b", "c"])
    first = balancer.pick("192.0.2.7", 0.0)
    second = balancer.pick("192.0.2.7", 0.0, exclude={first})  # type: ignore[arg-type]
    assert second is not None and second is not first


def test_ip_hash_same_address_twice_shares_the_load() -> None:
    balancer = ip_hash(["a", "a"])
    first, second = balancer.peers
    picked = Counter(balancer.pick(ip, 0.0) for ip in random_ips(2000))
    assert set(picked) == {first, second}  # neither copy shadows the other
    assert abs(picked[first] / 2000 - 0.5) < 0.1


def test_ip_hash_is_the_same_in_every_process() -> None:
    # Python's hash() differs per process; workers must still agree on every client.
    script = (
        "import json, sys\n"
        "from expserver.balancer import Balancer\n"
        "from expserver.config import UpstreamConfig as U\n"
        "b = Balancer([U(h, 8080) for h in 'abcde'], 'ip_hash')\n"
        "print(json.dumps([b.pick(ip, 0.0).host for ip in sys.argv[1:]]))\n"
    )
    ips = random_ips(200)
    results = []
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        out = subprocess.run(
            [sys.executable, "-c", script, *ips],
            env=env,
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(out.stdout))
    assert results[0] == results[1] == mapping(ip_hash(list("abcde")), ips)


def test_huge_weights_keep_the_ring_small_and_the_shares() -> None:
    balancer = ip_hash(["a", "b"], {"a": 1000, "b": 1000})
    assert len(balancer._rings[0].hashes) <= 40_000
    got = Counter(mapping(balancer, random_ips(10_000)))
    assert abs(got["a"] / 10_000 - 0.5) < 0.05


# --- active health checks ------------------------------------------------------------------------


def checker(passes: int = 1, fails: int = 1, *peers: Peer) -> HealthChecker:
    config = HealthCheckConfig(path="/health", passes=passes, fails=fails, expect_status=204)
    return HealthChecker(config, peers)


def test_health_flips_after_consecutive_results() -> None:
    peer = Peer("a", 1)
    check = checker(2, 3, peer)
    assert peer.healthy  # until proven otherwise
    assert [check.record(peer, False) for _ in range(2)] == [False, False]
    assert check.record(peer, True) is False  # a pass breaks the run of failures
    assert [check.record(peer, False) for _ in range(3)] == [False, False, True]
    assert not peer.healthy and not peer.available(0.0)
    assert check.record(peer, True) is False
    assert check.record(peer, False) is False  # a failure breaks the run of passes
    assert [check.record(peer, True) for _ in range(2)] == [False, True]
    assert peer.healthy
    assert check.record(peer, True) is False  # already healthy: nothing flips


def test_health_is_per_peer() -> None:
    a, b = Peer("a", 1), Peer("b", 1)
    check = checker(1, 1, a, b)
    check.record(a, False)
    assert (a.healthy, b.healthy) == (False, True)


def test_unhealthy_peer_gets_no_requests_until_it_passes() -> None:
    balancer = Balancer([up("a"), up("b")])
    a, _ = balancer.peers
    check = checker(2, 1, *balancer.peers)
    check.record(a, False)
    assert hosts(balancer, 4) == "bbbb"
    check.record(a, True)
    assert hosts(balancer, 2) == "bb"
    check.record(a, True)
    assert sorted(hosts(balancer, 4)) == ["a", "a", "b", "b"]


def test_health_probe_and_verdict() -> None:
    peer = Peer("::1", 9000)
    check = checker(1, 1, peer)
    assert check.request(peer) == (
        b"GET /health HTTP/1.1\r\nHost: [::1]:9000\r\n"
        b"User-Agent: expserver-health-check\r\nConnection: close\r\n\r\n"
    )
    assert b"Host: api.internal\r\n" in check.request(peer, host="api.internal")
    assert check.passed(204) and not check.passed(200) and not check.passed(None)


# --- construction --------------------------------------------------------------------------------


def test_peer_from_config() -> None:
    config = UpstreamConfig("::1", 9000, 3, 2, 4.5, True)
    peer = Peer.from_config(config)
    assert (peer.host, peer.port, peer.weight, peer.max_fails) == ("::1", 9000, 3, 2)
    assert (peer.fail_timeout, peer.backup, peer.address) == (4.5, True, config.address)
    assert (peer.active, peer.fails, peer.healthy) == (0, 0, True)


def test_balancer_refuses_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one upstream"):
        Balancer([])
    with pytest.raises(ValueError, match="unknown lb_method"):
        Balancer([up("a")], "fastest")


def test_every_method_of_the_config_is_built() -> None:
    for method in LB_METHODS:
        route = RouteConfig("/", "reverse_proxy", upstreams=(up("a"), up("b")), lb_method=method)
        assert Balancer.from_route(route).pick("ip", 0.0) is not None
