#!/usr/bin/env python3
"""TLS configuration scan: sslyze against expserver's TLS listener, checked against one of
Mozilla's TLS profiles (intermediate by default).

    python bench/tls_scan.py [--profile intermediate|modern|old] [--rsa] [--with-nginx]
                             [--cert PEM --key PEM] [--json out.json]

Starts `python -m expserver serve` (one worker) with a TLS listener on 127.0.0.1 and the
server's default TLS settings (only `cert` and `key` given), runs every sslyze scan command
against it (sslyze's Python API; the same as `python -m sslyze --mozilla_config=intermediate
localhost:PORT`, with the run's CA as a custom trust store), and prints what it finds:
accepted TLS versions, cipher suites per version with their key exchange, the groups
(curves) accepted, the certificate, resumption, renegotiation and the vulnerability checks,
then the Mozilla compliance result with every deviation. --with-nginx scans nginx
(nginx-light, the settings of compare_tls.py) with the same certificate, for reference.

The certificate is made for the run (a CA and an ECDSA P-256 leaf, or RSA 2048 with
--rsa, valid for 90 days as Mozilla recommends; the CA is given to sslyze as a custom trust
store) unless --cert/--key name one. Nothing
here is a pass/fail test: the exit status is 0 once the scan has reported, compliant or not
(2 if a scan could not run).
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402
import compare_tls as ct  # noqa: E402  (TLS configs of both servers)

CERT_LIFESPAN_DAYS = 90


def make_certificate(work: Path, rsa: bool) -> tuple[Path, Path, Path, str]:
    """A CA and a leaf for localhost/127.0.0.1, valid for 90 days (Mozilla's recommended
    lifespan, so that the lifespan check is about the server's configuration, not ours).

    Made with `cryptography` (a dependency of sslyze) rather than trustme: sslyze's path
    validation follows RFC 5280 strictly and refuses trustme's leaves (a critical
    subjectAltName beside a non-empty subject), so the chain would never validate. This
    one is what a public CA issues: CN + non-critical SAN, serverAuth, no CA bit.
    """
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.asymmetric import rsa as rsa_keys
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def new_key():  # type: ignore[no-untyped-def]
        if rsa:
            return rsa_keys.generate_private_key(public_exponent=65537, key_size=2048)
        return ec.generate_private_key(ec.SECP256R1())

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key, leaf_key = new_key(), new_key()
    ca_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "expserver bench"),
                         x509.NameAttribute(NameOID.COMMON_NAME, "expserver bench CA")])
    ca_cert = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
               .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(hours=1))
               .not_valid_after(now + datetime.timedelta(days=365))
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    leaf_cert = (x509.CertificateBuilder()
                 .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
                 .issuer_name(ca_name).public_key(leaf_key.public_key())
                 .serial_number(x509.random_serial_number())
                 .not_valid_before(now - datetime.timedelta(hours=1))
                 .not_valid_after(now + datetime.timedelta(days=CERT_LIFESPAN_DAYS))
                 .add_extension(x509.SubjectAlternativeName([
                     x509.DNSName("localhost"),
                     x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
                 .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                 .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=rsa,
                                              key_cert_sign=False, crl_sign=False,
                                              content_commitment=False, data_encipherment=False,
                                              key_agreement=False, encipher_only=False,
                                              decipher_only=False), critical=True)
                 .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                                critical=False)
                 .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()),
                                critical=False)
                 .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                     ca_key.public_key()), critical=False)
                 .sign(ca_key, hashes.SHA256()))
    cert, key, ca = work / "cert.pem", work / "key.pem", work / "ca.pem"
    cert.write_bytes(leaf_cert.public_bytes(serialization.Encoding.PEM))
    key.write_bytes(leaf_key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    for p in (cert, key, ca):
        p.chmod(0o644)
    kind = "RSA 2048" if rsa else "ECDSA P-256"
    return cert, key, ca, (f"{kind} leaf (CN=localhost, SAN localhost 127.0.0.1) signed by "
                           f"a CA made for the run, {CERT_LIFESPAN_DAYS} days")


# --------------------------------------------------------------------------- scanning


def scan(port: int, ca: Path | None) -> Any:
    """One sslyze ServerScanResult for 127.0.0.1:port (SNI localhost), all scan commands."""
    from sslyze import (
        CertificateInfoExtraArgument,
        ScanCommandsExtraArguments,
        Scanner,
        ServerNetworkLocation,
        ServerScanRequest,
    )
    extra = ScanCommandsExtraArguments(
        certificate_info=CertificateInfoExtraArgument(custom_ca_file=ca)) if ca else \
        ScanCommandsExtraArguments()
    request = ServerScanRequest(
        server_location=ServerNetworkLocation("localhost", port, ip_address="127.0.0.1"),
        scan_commands_extra_arguments=extra)
    scanner = Scanner()
    scanner.queue_scans([request])
    return next(iter(scanner.get_results()))


VERSIONS = [("ssl_2_0_cipher_suites", "SSLv2"), ("ssl_3_0_cipher_suites", "SSLv3"),
            ("tls_1_0_cipher_suites", "TLSv1.0"), ("tls_1_1_cipher_suites", "TLSv1.1"),
            ("tls_1_2_cipher_suites", "TLSv1.2"), ("tls_1_3_cipher_suites", "TLSv1.3")]


def _result(scan_result: Any, name: str) -> Any:
    attempt = getattr(scan_result, name)
    if attempt.status.name != "COMPLETED":
        return None
    return attempt.result


def _key_exchange(accepted: Any) -> str:
    key = accepted.ephemeral_key
    if key is None:
        return "-"
    curve = getattr(key, "curve_name", None)
    return f"ECDHE {curve} ({key.size} bits)" if curve else f"DHE {key.size} bits"


def summarize(result: Any) -> dict[str, Any]:
    """What the scan found, as plain data (also what --json saves)."""
    out: dict[str, Any] = {"connectivity": result.connectivity_status.name}
    if result.connectivity_result is not None:
        probe = result.connectivity_result
        out["highest_version"] = probe.highest_tls_version_supported.name
        out["probe_cipher"] = probe.cipher_suite_supported
    sr = result.scan_result
    if sr is None:
        out["error"] = result.connectivity_error_trace and "".join(
            result.connectivity_error_trace.format())
        return out
    versions: dict[str, Any] = {}
    for field, label in VERSIONS:
        r = _result(sr, field)
        if r is None:
            versions[label] = "scan failed"
            continue
        versions[label] = [
            {"suite": a.cipher_suite.name, "openssl": a.cipher_suite.openssl_name,
             "key_exchange": _key_exchange(a)} for a in r.accepted_cipher_suites] \
            if r.is_tls_version_supported else []
    out["versions"] = versions
    curves = _result(sr, "elliptic_curves")
    if curves is not None:
        out["groups_accepted"] = [c.name for c in (curves.supported_curves or [])]
        out["groups_rejected"] = [c.name for c in (curves.rejected_curves or [])]
    cert = _result(sr, "certificate_info")
    if cert is not None:
        deployments = []
        for d in cert.certificate_deployments:
            leaf = d.received_certificate_chain[0]
            key = leaf.public_key()
            size = getattr(key, "key_size", None) or getattr(getattr(key, "curve", None),
                                                             "key_size", None)
            deployments.append({
                "subject": leaf.subject.rfc4514_string(),
                "key": f"{type(key).__name__.replace('_', '')} {size}",
                "signature": leaf.signature_algorithm_oid._name,
                "lifespan_days": (leaf.not_valid_after_utc - leaf.not_valid_before_utc).days,
                "chain_length": len(d.received_certificate_chain),
                "valid_order": d.received_chain_has_valid_order,
                "trusted_by": [p.trust_store.name for p in d.path_validation_results
                               if p.was_validation_successful],
                "ocsp_stapled": d.ocsp_response is not None,
            })
        out["certificates"] = deployments
    res = _result(sr, "session_resumption")
    if res is not None:
        out["resumption"] = {
            "session_id": f"{res.session_id_resumption_result.name} "
                          f"({res.session_id_successful_resumptions_count}/"
                          f"{res.session_id_attempted_resumptions_count})",
            "tls_ticket": res.tls_ticket_resumption_result.name}
    checks: dict[str, Any] = {}
    for name, attr in (("heartbleed", "is_vulnerable_to_heartbleed"),
                       ("openssl_ccs_injection", "is_vulnerable_to_ccs_injection"),
                       ("tls_fallback_scsv", "supports_fallback_scsv"),
                       ("tls_compression", "supports_compression"),
                       ("tls_extended_master_secret", "supports_ems_extension"),
                       ("tls_1_3_early_data", "supports_early_data")):
        r = _result(sr, name)
        checks[f"{name}.{attr}"] = getattr(r, attr) if r is not None else "scan failed"
    robot = _result(sr, "robot")
    checks["robot"] = robot.robot_result.name if robot is not None else "scan failed"
    reneg = _result(sr, "session_renegotiation")
    if reneg is not None:
        checks["renegotiation.supports_secure_renegotiation"] = reneg.supports_secure_renegotiation
        checks["renegotiation.client_renegotiation_dos"] = \
            reneg.is_vulnerable_to_client_renegotiation_dos
    out["checks"] = checks
    headers = _result(sr, "http_headers")
    if headers is not None:
        hsts = headers.strict_transport_security_header
        out["hsts"] = None if hsts is None else {"max_age": hsts.max_age,
                                                "include_subdomains": hsts.include_subdomains}
    return out


def mozilla_check(result: Any, profile: str) -> tuple[str, dict[str, str]]:
    """("compliant" | "NOT compliant" | "incomplete: ...", {deviation: explanation})."""
    from sslyze.mozilla_tls_profile.tls_config_checker import (
        MozillaTlsConfiguration,
        ServerNotCompliantWithTlsConfiguration,
        ServerScanResultIncomplete,
        TlsConfigurationEnum,
        check_server_against_tls_configuration,
    )
    config = MozillaTlsConfiguration.get(TlsConfigurationEnum(profile))
    try:
        check_server_against_tls_configuration(result, config)
    except ServerNotCompliantWithTlsConfiguration as exc:
        return "NOT compliant", dict(exc.issues)
    except ServerScanResultIncomplete as exc:
        return f"incomplete: {exc}", {}
    return "compliant", {}


def report(name: str, port: int, s: dict[str, Any], verdict: str,
           issues: dict[str, str], profile: str) -> str:
    lines = [f"== {name} (127.0.0.1:{port}, SNI localhost): {s['connectivity']}"]
    if "versions" not in s:
        lines.append(f"   scan could not run: {s.get('error')}")
        return "\n".join(lines)
    accepted = [v for v, suites in s["versions"].items() if suites and suites != "scan failed"]
    refused = [v for v, suites in s["versions"].items() if suites == []]
    lines.append(f"versions accepted: {', '.join(accepted) or 'none'}; refused: "
                 f"{', '.join(refused) or 'none'}")
    for version in accepted:
        lines.append(f"  {version} cipher suites ({len(s['versions'][version])}):")
        for suite in s["versions"][version]:
            lines.append(f"    {suite['suite']:<48} {suite['key_exchange']}")
    if "groups_accepted" in s:
        lines.append(f"key exchange groups accepted: {', '.join(s['groups_accepted']) or '-'}")
    for cert in s.get("certificates", []):
        lines.append(f"certificate: {cert['subject']}, {cert['key']}, {cert['signature']}, "
                     f"{cert['lifespan_days']} days, chain of {cert['chain_length']} "
                     f"({'in order' if cert['valid_order'] else 'NOT in order'}), "
                     f"trusted by {', '.join(cert['trusted_by']) or 'no trust store'}, OCSP "
                     f"{'stapled' if cert['ocsp_stapled'] else 'not stapled'}")
    if "resumption" in s:
        lines.append(f"resumption: session IDs {s['resumption']['session_id']}, tickets "
                     f"{s['resumption']['tls_ticket']}")
    lines.append("checks: " + "; ".join(f"{k} {v}" for k, v in s["checks"].items()))
    if "hsts" in s:
        lines.append(f"HSTS: {s['hsts'] or 'none'} (not part of sslyze's Mozilla check)")
    lines.append(f"Mozilla {profile} profile: {verdict}")
    for key, text in issues.items():
        lines.append(f"  deviation {key}: {text}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--profile", choices=("intermediate", "modern", "old"),
                    default="intermediate", help="Mozilla profile to check against")
    ap.add_argument("--rsa", action="store_true", help="an RSA 2048 certificate "
                    "(default ECDSA P-256)")
    ap.add_argument("--cert", type=Path, help="scan with this certificate chain (PEM)")
    ap.add_argument("--key", type=Path, help="its private key (PEM)")
    ap.add_argument("--ca", type=Path, help="trust store for --cert (PEM)")
    ap.add_argument("--with-nginx", action="store_true",
                    help="scan nginx (same certificate) too, for reference")
    ap.add_argument("--json", type=Path, help="also save the findings here")
    ap.add_argument("--expserver-cmd", default=h.DEFAULT_EXPSERVER_CMD,
                    help="command template; placeholders {python} {config} {dir} {port}")
    args = ap.parse_args()
    try:
        import sslyze  # noqa: F401
    except ImportError:
        sys.exit("tls_scan.py needs sslyze: pip install -e '.[bench]' (or pip install sslyze)")
    if args.with_nginx:
        h.ensure_debian_packages({"nginx": "nginx-light"})
    h.install_signal_exit()
    # sslyze's bundled trust stores hold a root with a non-positive serial number, which
    # makes cryptography warn on every load; it says nothing about the server scanned
    warnings.filterwarnings("ignore", message="Parsed a serial number")

    findings: dict[str, Any] = {}
    texts: list[str] = []
    with tempfile.TemporaryDirectory(prefix="expserver-tls-scan-") as tmp:
        work = Path(tmp)
        work.chmod(0o755)
        root = work / "www"
        root.mkdir(mode=0o755)
        (root / "index.html").write_text("<!DOCTYPE html><title>scan</title>\n")
        (root / "index.html").chmod(0o644)
        if args.cert:
            if not args.key:
                sys.exit("--cert needs --key")
            cert, key, ca, cert_kind = args.cert.resolve(), args.key.resolve(), args.ca, \
                f"given: {args.cert}"
        else:
            cert, key, ca, cert_kind = make_certificate(work, args.rsa)
        print(f"certificate: {cert_kind}", file=sys.stderr)
        ports = {name: h.free_port() for name in
                 ("expserver", "expserver_tls", "nginx", "nginx_tls")}
        servers: list[h.Server] = []
        try:
            config = work / "expserver.json"
            ct.write_expserver_config(config, root, ports, cert, key, ct.PROTOCOLS["both"])
            # only cert and key: the scan is of expserver's defaults
            data = json.loads(config.read_text())
            data["servers"][1]["tls"] = {"cert": str(cert), "key": str(key)}
            config.write_text(json.dumps(data, indent=2))
            servers += h.start_expserver(args.expserver_cmd, config=config, root=root,
                                         workdir=work,
                                         ports=[ports["expserver"], ports["expserver_tls"]])
            targets = [("expserver", ports["expserver_tls"])]
            if args.with_nginx:
                conf = work / "nginx.conf"
                ct.write_nginx_conf(conf, work, root, ports, cert, key, ct.PROTOCOLS["both"],
                                    probe=False)
                nginx = h.start_nginx(conf, work)
                servers.append(nginx)
                nginx.wait_ready([ports["nginx"], ports["nginx_tls"]])
                targets.append(("nginx", ports["nginx_tls"]))
            for name, port in targets:
                print(f"scanning {name} on 127.0.0.1:{port} (sslyze, every scan command; "
                      f"~30-60 s) ...", file=sys.stderr)
                result = scan(port, ca)
                summary = summarize(result)
                verdict, issues = mozilla_check(result, args.profile) \
                    if result.scan_result is not None else ("scan did not run", {})
                summary["mozilla"] = {"profile": args.profile, "verdict": verdict,
                                      "deviations": issues}
                findings[name] = summary
                texts.append(report(name, port, summary, verdict, issues, args.profile))
        finally:
            for server in reversed(servers):
                server.stop()

    from sslyze.__version__ import __version__ as sslyze_version
    print()
    print(f"sslyze {sslyze_version}, Mozilla TLS profile {args.profile} (sslyze's profile "
          f"file 5.7); certificate: {cert_kind}")
    print("\n\n".join(texts))
    if args.json:
        args.json.write_text(json.dumps({"sslyze": sslyze_version, "certificate": cert_kind,
                                         "profile": args.profile, "servers": findings},
                                        indent=2, default=str))
        print(f"saved {args.json}")
    return 2 if any("versions" not in f for f in findings.values()) else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; servers stopped", file=sys.stderr)
        sys.exit(130)
