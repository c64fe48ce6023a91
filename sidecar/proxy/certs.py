"""HTTPS interception's certificates: the CA (given, or generated once into `state_dir`) and the leaf
certificates it signs per host, cached while they are fresh.

Keys and certificates are made with `cryptography`; Python's `ssl` loads a chain only from files, so a
leaf's key is written to a file that only this UID may read, loaded, and removed at once. The CA key is
read once at start and never logged, shown in /config, or written anywhere but its own 0600 file.
Leaves are ECDSA P-256, valid LEAF_LIFETIME (backdated an hour for clock skew), cached up to MAX_LEAVES
hosts and renewed when less than a quarter of their life is left.
"""
from __future__ import annotations

import datetime
import os
import ssl
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from sidecar.policy.errors import CertError

CA_CERT = "intercept-ca.pem"
CA_KEY = "intercept-ca.key"
BUNDLE = "intercept-bundle.pem"          # the system CAs plus ours: what an app is told to trust
CA_LIFETIME = datetime.timedelta(days=3650)
LEAF_LIFETIME = datetime.timedelta(days=1)
MAX_LEAVES = 1000


@dataclass(frozen=True, slots=True)
class Authority:
    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey | object
    cert_file: str                        # the CA certificate (PEM), to mount into apps
    bundle_file: str | None               # system CAs + this CA, when the sidecar wrote one


def load_or_create(cert_file: str | None, key_file: str | None, state_dir: str) -> Authority:
    """The configured CA, or the one in `state_dir` (made there on first start)."""
    if cert_file and key_file:
        try:
            cert = x509.load_pem_x509_certificate(Path(cert_file).read_bytes())
            key = serialization.load_pem_private_key(Path(key_file).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise CertError(f"intercept CA {cert_file} / {key_file} could not be loaded: "
                            f"{type(exc).__name__}") from None
        return Authority(cert, key, cert_file, _bundle(state_dir, cert_file))
    directory = Path(state_dir)
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    try:
        directory.mkdir(parents=True, exist_ok=True)
        if cert_path.exists() and key_path.exists():
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        else:
            cert, key = _new_ca()
            _write_private(key_path, key.private_bytes(serialization.Encoding.PEM,
                                                       serialization.PrivateFormat.PKCS8,
                                                       serialization.NoEncryption()))
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(key_path, 0o600)         # whoever made it: readable by this UID only
    except (OSError, ValueError, TypeError) as exc:
        raise CertError(f"intercept CA in {directory} could not be loaded or created: "
                        f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or ''}".rstrip(": ")) from None
    return Authority(cert, key, str(cert_path), _bundle(state_dir, str(cert_path)))


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _new_ca() -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sidecar interception CA"),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sidecar")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + CA_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return cert, key


def _bundle(state_dir: str, ca_file: str) -> str | None:
    """System CAs + the interception CA, written into state_dir, and with the CA certificate (never its
    key) into $SIDECAR_CA_DIR when set (`sidecar inject --intercept` mounts that into the app)."""
    publish = os.environ.get("SIDECAR_CA_DIR")
    if publish:
        try:
            Path(publish).mkdir(parents=True, exist_ok=True)
            (Path(publish) / CA_CERT).write_bytes(Path(ca_file).read_bytes())
            _write_bundle(publish, ca_file)
        except OSError:
            pass
    return _write_bundle(state_dir, ca_file)


def _write_bundle(state_dir: str, ca_file: str) -> str | None:
    system = ssl.get_default_verify_paths().openssl_cafile   # not SSL_CERT_FILE: that may be our own bundle
    try:
        parts = [Path(system).read_bytes()] if system and Path(system).exists() else []
        parts.append(Path(ca_file).read_bytes())
        path = Path(state_dir) / BUNDLE
        Path(state_dir).mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"\n".join(parts))
        return str(path)
    except OSError:
        return None


class Leaves:
    """Server-side TLS contexts per intercepted host, each with a leaf certificate for that host."""

    def __init__(self, authority: Authority, alpn: list[str], clock=time.time) -> None:
        self.authority = authority
        self.alpn = alpn                  # sniff.ALPN_PROTOCOLS: read when a context is made
        self.clock = clock
        self._cache: OrderedDict[str, tuple[float, ssl.SSLContext]] = OrderedDict()
        self._key = ec.generate_private_key(ec.SECP256R1())   # one leaf key per process, many leaves
        self._key_pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.NoEncryption())

    def context(self, host: str) -> ssl.SSLContext:
        now = self.clock()
        hit = self._cache.get(host)
        if hit is not None and hit[0] > now:
            self._cache.move_to_end(host)
            return hit[1]
        ctx = self._make(host)
        renew_at = now + LEAF_LIFETIME.total_seconds() * 0.75
        self._cache[host] = (renew_at, ctx)
        self._cache.move_to_end(host)
        while len(self._cache) > MAX_LEAVES:
            self._cache.popitem(last=False)
        return ctx

    def leaf(self, host: str) -> x509.Certificate:
        ca = self.authority
        now = datetime.datetime.now(datetime.timezone.utc)
        try:
            import ipaddress
            san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            san = x509.DNSName(host)
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])]))
                .issuer_name(ca.cert.subject).public_key(self._key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + LEAF_LIFETIME)
                .add_extension(x509.SubjectAlternativeName([san]), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.cert.public_key()),
                               critical=False)
                .sign(ca.key, hashes.SHA256()))

    def _make(self, host: str) -> ssl.SSLContext:
        cert = self.leaf(host)
        chain = cert.public_bytes(serialization.Encoding.PEM) + \
            self.authority.cert.public_bytes(serialization.Encoding.PEM)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_alpn_protocols(list(self.alpn))
        with tempfile.TemporaryDirectory(prefix="sidecar-leaf-") as tmp:   # 0700: this UID only
            cert_path, key_path = os.path.join(tmp, "leaf.pem"), os.path.join(tmp, "leaf.key")
            with open(cert_path, "wb") as f:
                f.write(chain)
            _write_private(Path(key_path), self._key_pem)
            ctx.load_cert_chain(cert_path, key_path)
        return ctx
