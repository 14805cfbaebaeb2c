"""TLS for the embedded facility's data servers: a certificate authority of its own.

A site's data servers carry host certificates from a grid CA that every worker trusts (the
hashed CA folder ``X509_CERT_DIR``, ``/etc/grid-security/certificates``). The embedded facility
plays both parts: it makes a CA once, signs a certificate for the hosts its regions name, and
points its clients and workers at the CA with ``X509_CERT_DIR``, which the XRootD client reads
and which https reads add to the usual public CAs (as grid https clients do). Tokens travel
over these connections only: the XRootD servers refuse a token on a connection without TLS.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import ssl
import subprocess
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from facility.config import FacilityConfig

CA_DAYS = 3650
SERVER_DAYS = 825


@dataclass(frozen=True)
class DataTLS:
    """Where the data servers' TLS files are: the CA, the CA in OpenSSL's hashed-folder layout
    (as ``X509_CERT_DIR`` expects it), the server's certificate and key."""

    folder: Path
    ca: Path
    ca_dir: Path
    cert: Path
    key: Path


def data_tls(config: FacilityConfig) -> DataTLS:
    folder = config.state_path / "tls"
    return DataTLS(folder, ca=folder / "ca.pem", ca_dir=folder / "certificates",
                   cert=folder / "server.pem", key=folder / "server.key")


def server_hosts(config: FacilityConfig) -> list[str]:
    """The names the servers answer to: every region's host, and the loopback names."""
    return sorted({"localhost", "127.0.0.1", *(r.host for r in config.regions)})


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _write(path: Path, data: bytes, mode: int) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(data)
    path.chmod(mode)


def _pem_key(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _make_ca(tls: DataTLS) -> None:
    key = _private_key()
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "facility"),
                      x509.NameAttribute(NameOID.COMMON_NAME, "facility data servers CA")])
    usage = x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(usage, critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()),
                           critical=False)
            .sign(key, hashes.SHA256()))
    _write(tls.folder / "ca.key", _pem_key(key), 0o600)
    _write(tls.ca, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _alternative_name(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _make_server_cert(tls: DataTLS, hosts: list[str]) -> None:
    ca_key = serialization.load_pem_private_key((tls.folder / "ca.key").read_bytes(), None)
    ca_cert = x509.load_pem_x509_certificate(tls.ca.read_bytes())
    key = _private_key()
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(_now() - datetime.timedelta(hours=1))
            .not_valid_after(_now() + datetime.timedelta(days=SERVER_DAYS))
            .add_extension(x509.SubjectAlternativeName([_alternative_name(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)  # type: ignore[arg-type]
            .sign(ca_key, hashes.SHA256()))  # type: ignore[arg-type]
    _write(tls.key, _pem_key(key), 0o600)
    _write(tls.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)


def _covers(tls: DataTLS, hosts: list[str]) -> bool:
    """The server certificate exists, is valid for a while yet and names every host."""
    try:
        cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    except (OSError, ValueError):
        return False
    if cert.not_valid_after_utc < _now() + datetime.timedelta(days=7):
        return False
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    named = {str(n.value) for n in names}
    return set(hosts) <= named


def _hashed_folder(tls: DataTLS) -> None:
    """``<subject hash>.0`` as OpenSSL (and so XRootD) looks CAs up."""
    subject_hash = subprocess.run(
        ["openssl", "x509", "-noout", "-subject_hash", "-in", str(tls.ca)],
        capture_output=True, text=True, check=True).stdout.strip()
    tls.ca_dir.mkdir(exist_ok=True)
    for old in tls.ca_dir.iterdir():
        old.unlink()
    (tls.ca_dir / f"{subject_hash}.0").write_bytes(tls.ca.read_bytes())
    tls.ca_dir.chmod(0o755)


def ensure_data_tls(config: FacilityConfig) -> DataTLS:
    """The CA (made once) and a server certificate naming every configured host."""
    tls = data_tls(config)
    tls.folder.mkdir(parents=True, exist_ok=True)
    tls.folder.chmod(0o755)
    if not tls.ca.exists():
        _make_ca(tls)
    hosts = server_hosts(config)
    if not _covers(tls, hosts):
        _make_server_cert(tls, hosts)
    _hashed_folder(tls)
    return tls


def client_tls_environment(config: FacilityConfig) -> dict[str, str]:
    """What makes a client or worker trust the embedded data servers (nothing when the
    facility's CA was never made: the site's own CAs are then in the default places)."""
    tls = data_tls(config)
    if not tls.ca.exists():
        return {}
    return {"X509_CERT_DIR": str(tls.ca_dir)}


_https_contexts: dict[str, ssl.SSLContext] = {}


def https_context() -> ssl.SSLContext:
    """The public CAs and those of ``X509_CERT_DIR``; one per process and folder (the https
    filesystem is cached by its options, so the same context must come back)."""
    folder = os.environ.get("X509_CERT_DIR", "")
    context = _https_contexts.get(folder)
    if context is None:
        context = ssl.create_default_context()
        if folder and Path(folder).is_dir():
            context.load_verify_locations(capath=folder)
        _https_contexts[folder] = context
    return context
