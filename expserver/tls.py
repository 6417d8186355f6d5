"""TLS set-up with the stdlib ``ssl`` module: server contexts, SNI, upstream contexts.

Contexts are built in the master before it forks (:func:`listener_contexts`), so every
worker shares the same session-ticket keys: a client resumes its session whichever worker
its next connection reaches. Each server with a ``tls`` object gets one context (its
certificate); a TLS listener starts every handshake on its first TLS server's context, and
the SNI callback switches to the server whose ``hostnames`` hold the name the client asked
for (exact, or a ``*.example.test`` wildcard for one label); a client without SNI, or with
a name no server has, keeps the first one.

Defaults follow Mozilla's "intermediate" profile: TLS 1.2 and 1.3, ECDHE key exchange with
AEAD ciphers, the client's cipher preference, no renegotiation, ALPN ``http/1.1``.
"""
from __future__ import annotations

import os
import ssl
import sys
import time
from collections.abc import Sequence
from typing import Any

from . import log
from .config import Config, ConfigError, ServerConfig, TLSConfig, UpstreamTLSConfig

PROTOCOLS = {"TLSv1.2": ssl.TLSVersion.TLSv1_2, "TLSv1.3": ssl.TLSVersion.TLSv1_3}
ALPN = ["http/1.1"]
EXPIRY_WARNING_DAYS = 14


def server_context(tls: TLSConfig) -> ssl.SSLContext:
    """The context of one server's certificate. Raises ConfigError naming the file."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    versions = sorted(PROTOCOLS[p] for p in tls.protocols)
    ctx.minimum_version, ctx.maximum_version = versions[0], versions[-1]
    ctx.set_ciphers(tls.ciphers)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    # a client that closes without close_notify (most do) is an EOF, not a fatal error:
    # OpenSSL 3 otherwise drops the session from its cache (nginx sets it too); requests
    # are framed by HTTP, so a truncation cannot pass for a complete one
    ctx.options |= ssl.OP_IGNORE_UNEXPECTED_EOF
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE     # intermediate: the client chooses
    if not tls.session_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(ALPN)
    # One TLS 1.3 ticket per handshake, not OpenSSL's two: a browser uses one per
    # connection, and each costs a session serialisation and an encryption.
    ctx.num_tickets = 1
    _set_groups(ctx, tls.groups)
    password = os.environ.get(tls.password_env) if tls.password_env else None
    if tls.password_env and password is None:
        raise ConfigError("tls.password_env", f"environment variable {tls.password_env} "
                                              "is not set")
    try:
        ctx.load_cert_chain(tls.cert, tls.key, password)
    except FileNotFoundError as e:
        raise ConfigError("tls", f"{e.filename}: no such file") from None
    except ssl.SSLError as e:
        raise ConfigError("tls", f"{tls.cert} / {tls.key}: {_ssl_reason(e)}") from None
    except OSError as e:
        raise ConfigError("tls", f"{e.filename or tls.cert}: {e.strerror}") from None
    return ctx


# Mozilla intermediate's key exchange groups. The stdlib has no SSLContext call for a list
# of groups before Python 3.15 (set_ecdh_curve takes one curve), so this calls OpenSSL's
# SSL_CTX_set1_groups_list on the context's SSL_CTX, found in the _ssl module's object
# (the first field after the object header) through the libssl _ssl itself is linked to.
SSL_CTRL_SET_GROUPS_LIST = 92


def _set_groups(ctx: ssl.SSLContext, groups: str) -> None:
    if not groups:
        return
    if not (3, 8) <= sys.version_info[:2] <= (3, 13):    # the object layout is known here
        log.warn(f"this Python cannot restrict the TLS groups to {groups}: OpenSSL's "
                 "defaults are used")
        return
    import ctypes
    lib = ctypes.CDLL(ssl._ssl.__file__)  # type: ignore[attr-defined]
    lib.SSL_CTX_ctrl.restype = ctypes.c_long
    lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_char_p]
    ssl_ctx = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ssl_ctx or lib.SSL_CTX_ctrl(ssl_ctx, SSL_CTRL_SET_GROUPS_LIST, 0,
                                       groups.encode()) != 1:
        raise ConfigError("tls", f"OpenSSL refused the key exchange groups {groups!r}")


def _ssl_reason(e: ssl.SSLError) -> str:
    reason = (e.reason or str(e)).replace("_", " ").lower()
    if "key values mismatch" in reason:
        return "the key does not match the certificate"
    if "bad decrypt" in reason or "bad password" in reason:
        return "the key cannot be decrypted (wrong password?)"
    return reason


def _pick(hostnames: dict[str, ssl.SSLContext], name: str) -> ssl.SSLContext | None:
    """The context for an SNI name, by the rule that selects servers by Host (exact names
    first, then the first wildcard whose suffix ends the name)."""
    name = name.lower().rstrip(".")
    ctx = hostnames.get(name)
    if ctx is None:
        for pattern, candidate in hostnames.items():
            if pattern.startswith("*.") and name.endswith(pattern[1:]):
                return candidate
    return ctx


def sni_router(servers: Sequence[tuple[ServerConfig, ssl.SSLContext]]) -> ssl.SSLContext:
    """The listener's starting context, whose SNI callback picks the server's context."""
    by_name: dict[str, ssl.SSLContext] = {}
    for server, ctx in servers:
        for name in server.hostnames:
            by_name.setdefault(name, ctx)
    first = servers[0][1]

    def choose(conn: Any, name: str | None, ctx: ssl.SSLContext) -> None:
        if name:
            chosen = _pick(by_name, name)
            if chosen is not None and chosen is not ctx:
                conn.tls_object.context = chosen

    if len(servers) > 1 and by_name:
        first.sni_callback = choose
    return first


Address = tuple[str, int]


def listener_contexts(cfg: Config) -> dict[Address, ssl.SSLContext]:
    """One starting context per TLS listener address (built once, before forking)."""
    contexts: dict[int, ssl.SSLContext] = {}
    for i, server in enumerate(cfg.servers):
        if server.tls is not None:
            contexts[i] = server_context(server.tls)
    out: dict[Address, ssl.SSLContext] = {}
    addresses = {(lc.host, lc.port) for s in cfg.servers for lc in s.listeners if lc.tls}
    for address in addresses:
        on_it = [(cfg.servers[i], contexts[i]) for i in contexts
                 if any((lc.host, lc.port) == address and lc.tls
                        for lc in cfg.servers[i].listeners)]
        out[address] = sni_router(on_it)
    return out


def upstream_context(options: UpstreamTLSConfig) -> ssl.SSLContext:
    """Client context for https:// upstreams: the system CAs (or ``ca_file``) unless
    verification is turned off explicitly."""
    ctx = ssl.create_default_context(cafile=options.ca_file)
    if not options.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols(ALPN)
    return ctx


# --- `expserver check` ----------------------------------------------------------------------


def certificate_summary(tls: TLSConfig, now: float | None = None) -> tuple[str, str | None]:
    """(one line about the certificate, a warning or None) for ``expserver check``."""
    info = ssl._ssl._test_decode_cert(tls.cert)  # type: ignore[attr-defined]
    subject = ", ".join(f"{k}={v}" for rdn in info.get("subject", ()) for k, v in rdn)
    sans = " ".join(v for _, v in info.get("subjectAltName", ())) or "none"
    expires = ssl.cert_time_to_seconds(info["notAfter"])
    days = (expires - (time.time() if now is None else now)) / 86400
    line = f"certificate {tls.cert}: subject {subject or '-'}; names {sans}; " \
           f"expires {info['notAfter']} ({days:.0f} days)"
    warning = None
    if days < 0:
        warning = f"certificate {tls.cert} expired {-days:.0f} days ago"
    elif days < EXPIRY_WARNING_DAYS:
        warning = f"certificate {tls.cert} expires in {days:.1f} days"
    return line, warning
