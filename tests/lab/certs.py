"""Certificates made at test time: a CA, server certificates with IP and DNS SANs."""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.tls import spki_pin

Key = ec.EllipticCurvePrivateKey


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass(frozen=True)
class CertFiles:
    cert: Path  # PEM, leaf first (then the CA, when issued by one)
    key: Path
    pin: str
    der: bytes


@dataclass(frozen=True)
class CA:
    key: Key
    cert: x509.Certificate
    path: Path  # PEM of the CA certificate: a CA bundle for the client

    @classmethod
    def create(cls, directory: Path, name: str = "dnstls-agent test CA") -> CA:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name(name))
            .issuer_name(_name(name))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .sign(key, hashes.SHA256())
        )
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"ca-{cert.serial_number % 100000}.pem"
        path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, path)

    def issue(
        self,
        directory: Path,
        stem: str,
        *,
        ips: tuple[str, ...] = (),
        names: tuple[str, ...] = (),
        expired: bool = False,
    ) -> CertFiles:
        return issue(directory, stem, ips=ips, names=names, expired=expired, ca=self)


def issue(
    directory: Path,
    stem: str,
    *,
    ips: tuple[str, ...] = (),
    names: tuple[str, ...] = (),
    expired: bool = False,
    ca: CA | None = None,
) -> CertFiles:
    """A server certificate; self-signed when `ca` is None."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    if expired:
        start, end = now - dt.timedelta(days=10), now - dt.timedelta(days=1)
    else:
        start, end = now - dt.timedelta(hours=1), now + dt.timedelta(days=2)
    sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    sans += [x509.DNSName(n) for n in names]
    subject = _name(names[0] if names else (ips[0] if ips else stem))
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca.cert.subject if ca else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False
        )
    cert = builder.sign(ca.key if ca else key, hashes.SHA256())
    directory.mkdir(parents=True, exist_ok=True)
    cert_path = directory / f"{stem}.pem"
    key_path = directory / f"{stem}.key"
    chain = cert.public_bytes(serialization.Encoding.PEM)
    if ca:
        chain += ca.cert.public_bytes(serialization.Encoding.PEM)
    cert_path.write_bytes(chain)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return CertFiles(cert_path, key_path, spki_pin(der), der)
