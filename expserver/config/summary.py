"""The account of a config that `expserver check` prints: one line per server and route."""

from __future__ import annotations

from .model import Config, ListenerConfig, RouteConfig, ServerConfig, UpstreamConfig
from .specs import _show


def _address(listener: ListenerConfig) -> str:
    host = f"[{listener.host}]" if ":" in listener.host else listener.host
    return f"{host}:{listener.port}"


def _acl_text(whitelist: tuple[str, ...], blacklist: tuple[str, ...]) -> list[str]:
    parts = []
    if whitelist:
        parts.append("allow " + " ".join(whitelist))
    if blacklist:
        parts.append("deny " + " ".join(blacklist))
    return parts


def _upstream_text(upstream: UpstreamConfig) -> str:
    params = [f"weight {upstream.weight}"] if upstream.weight != 1 else []
    params += ["backup"] if upstream.backup else []
    return upstream.address + (f" ({', '.join(params)})" if params else "")


def _route_text(route: RouteConfig) -> str:
    if route.type == "file_serve":
        parts = [f"{route.dir_path}", "index " + (" ".join(route.index) or "-")]
        parts.append("autoindex" if route.autoindex else "no autoindex")
        if route.dotfiles == "allow":
            parts.append("dotfiles allowed")
    elif route.type == "redirect":
        parts = [f"{route.http_status_code} {route.redirect_url}"]
    elif route.type == "reverse_proxy":
        parts = [" ".join(_upstream_text(u) for u in route.upstreams), route.lb_method]
        if route.health_check:
            check = route.health_check
            parts.append(f"health check {check.path} every {check.interval:g}s")
    else:
        parts = []
    if route.gzip_enable:
        parts.append(f"gzip {route.gzip_level}")
    if route.brotli_enable:
        parts.append(f"brotli {route.brotli_level}")
    parts += _acl_text(route.ip_whitelist, route.ip_blacklist)
    return route.type + (" " + ", ".join(parts) if parts else "")


_LIMIT_NAMES = {
    "keepalive_timeout": "keepalive",
    "header_timeout": "header",
    "send_timeout": "send",
    "body_timeout": "body",
    "connect_timeout": "connect",
    "upstream_read_timeout": "upstream read",
    "upstream_send_timeout": "upstream send",
}


Limited = Config | ServerConfig | RouteConfig


def _limits_text(obj: Limited, parent: Config | ServerConfig | None) -> str:
    """The cascading values of ``obj`` that differ from ``parent``'s (all of them if None)."""
    parts = []
    for name, word in _LIMIT_NAMES.items():
        value = getattr(obj, name, None)
        if value is not None and (parent is None or value != getattr(parent, name)):
            parts.append(f"{word} {value:g}s")
    text = "timeouts " + ", ".join(parts) if parts else ""
    size = obj.max_body_size
    if parent is None or size != parent.max_body_size:
        text += ("; " if text else "") + "max_body_size "
        text += f"{size} bytes" if size else "unlimited"
    return text


def summary(cfg: Config) -> str:
    """A human-readable account of ``cfg``, one line per server and per route."""
    lines = [
        (
            f"config {cfg.source or '(built in)'}: {len(cfg.servers)} server(s), "
            f"{cfg.workers} worker(s), server_name {_show(cfg.server_name)}"
        ),
        "timeouts: " + _limits_text(cfg, None).removeprefix("timeouts "),
        f"max_connections {cfg.max_connections} per worker, drain_timeout {cfg.drain_timeout:g}s",
    ]
    for i, server in enumerate(cfg.servers):
        head = [
            "listen " + " ".join(_address(listener) for listener in server.listeners),
            "hostnames " + (" ".join(server.hostnames) or "any"),
            *_acl_text(server.ip_whitelist, server.ip_blacklist),
        ]
        own = _limits_text(server, cfg)
        lines.append(f"servers[{i}]: " + "; ".join(head) + (f"; {own}" if own else ""))
        width = max((len(route.req_path) for route in server.routes), default=0)
        for route in server.routes:
            own = _limits_text(route, server)
            lines.append(f"  {route.req_path:<{width}} -> {_route_text(route)}")
            lines[-1] += f"; {own}" if own else ""
        if not server.routes:
            lines.append("  (no routes: every request answers 404)")
    return "\n".join(lines)
