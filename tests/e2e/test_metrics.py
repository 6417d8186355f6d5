"""The metrics route: eXpServer's dashboard JSON contract, Prometheus text, all workers."""
import json
import time

from .conftest import request

INT_KEYS = [
    "uptime_msec", "pid", "workers", "sys_cpu_usage_percent", "sys_ram_usage_bytes",
    "sys_ram_total_bytes", "workers_ram_usage_bytes", "conn_current", "conn_accepted",
    "conn_error", "conn_timeout", "conn_accepted_error", "req_current", "req_total",
    "req_file_serve", "req_reverse_proxy", "req_redirect", "res_avg_res_time_msec",
    "res_peak_res_time_msec", "res_code_1xx", "res_code_2xx", "res_code_3xx", "res_code_4xx",
    "res_code_5xx", "traffic_total_send_bytes", "traffic_total_recv_bytes",
]


def routes(root):
    return [
        {"req_path": "/", "type": "file_serve", "dir_path": str(root)},
        {"req_path": "/go", "type": "redirect", "redirect_url": "http://example.test/"},
        {"req_path": "/metrics", "type": "metrics"},
    ]


def figures(served, path="/metrics"):
    status, headers, body = request(served, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert status == 200
    assert headers["content-type"] == "application/json"
    assert headers["access-control-allow-origin"] == "*"
    return json.loads(body)


def test_json_contract_and_counts(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello")
    served = start(routes=routes(root), server_name="edge-1")
    for _ in range(3):
        assert request(served, b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    assert request(served, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
    assert request(served, b"GET /go HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 302
    f = figures(served)
    for key in INT_KEYS:
        assert type(f[key]) is int, key
    assert f["server_name"] == "edge-1"
    assert f["workers"] == 1 and f["pid"] == served.server.pid
    assert f["workers_cpu_usage_percent"] == [f["workers_cpu_usage_percent"][0]]
    assert f["req_total"] == 6                  # this metrics request included
    assert f["req_file_serve"] == 4 and f["req_redirect"] == 1
    assert (f["res_code_2xx"], f["res_code_3xx"], f["res_code_4xx"]) == (3, 1, 1)
    assert f["req_current"] == 1
    assert f["conn_accepted"] == 7             # 6 requests + the harness's readiness probe
    assert f["traffic_total_recv_bytes"] > 0 and f["traffic_total_send_bytes"] > 0
    assert 0 < f["sys_ram_usage_bytes"] < f["sys_ram_total_bytes"]
    assert f["workers_ram_usage_bytes"] > 1_000_000


def test_prometheus_text_follows_the_conventions(start, tmp_path):
    """Parsed by prometheus_client's own parser: HELP and TYPE for every family, counters
    named *_total, seconds, labels for route kinds and status classes, a histogram."""
    from prometheus_client.parser import text_string_to_metric_families
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.txt").write_bytes(b"hello")
    served = start(routes=routes(root))
    for _ in range(3):
        assert request(served, b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    assert request(served, b"GET /nope HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
    status, headers, body = request(
        served, b"GET /metrics?format=prometheus HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    families = {f.name: f for f in text_string_to_metric_families(body.decode())}
    for family in families.values():
        assert family.documentation, family.name
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
    def value(family, name, **labels):
        return next(s.value for s in families[family].samples
                    if s.name == name and s.labels == labels)
    assert families["expserver_requests"].type == "counter"
    assert value("expserver_requests", "expserver_requests_total", kind="file_serve") == 4
    assert value("expserver_requests", "expserver_requests_total", kind="metrics") == 1
    assert value("expserver_responses", "expserver_responses_total", code="2xx") == 3
    assert value("expserver_responses", "expserver_responses_total", code="4xx") == 1
    hist = families["expserver_request_duration_seconds"]
    assert hist.type == "histogram"
    buckets = [s for s in hist.samples if s.name.endswith("_bucket")]
    counts = [s.value for s in buckets]
    assert counts == sorted(counts) and buckets[-1].labels == {"le": "+Inf"}
    assert counts[-1] == 4 == value("expserver_request_duration_seconds",
                                    "expserver_request_duration_seconds_count")
    assert 0 < value("expserver_request_duration_seconds",
                     "expserver_request_duration_seconds_sum") < 1
    assert families["expserver_connections"].type == "gauge"
    assert value("expserver_worker_resident_memory_bytes",
                 "expserver_worker_resident_memory_bytes", worker="0") > 1_000_000


def test_dashboard_reads_the_worker_usage_fields(start, tmp_path):
    served = start(routes=routes(tmp_path))
    for _ in range(50):
        request(served, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    f = figures(served)
    assert type(f["server_cpu_usage_time_msec"]) is int and f["server_cpu_usage_time_msec"] > 0
    assert f["server_ram_usage_bytes"] == f["workers_ram_usage_bytes"] > 1_000_000


def test_figures_add_up_over_workers(start, tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    (root / "a.txt").write_bytes(b"x")
    served = start(routes=routes(root), workers=2)
    for _ in range(20):
        assert request(served, b"GET /a.txt HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 200
    time.sleep(0.8)                             # each worker publishes twice a second
    f = figures(served)
    assert f["workers"] == 2
    assert len(f["workers_cpu_usage_percent"]) == 2
    assert f["req_file_serve"] == 20
    assert f["res_code_2xx"] == 20


def test_server_without_routes_answers_the_dashboard_at_api(start):
    served = start(servers=[{}])
    f = figures(served, "/api")
    assert f["req_total"] == 1
    assert request(served, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 404
