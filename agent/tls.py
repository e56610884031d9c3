"""TLS as the agent uses it: client contexts, SPKI pins, IP-SAN and name checks.

Also `TLSEngine`, a sans-I/O TLS client (an `ssl.SSLObject` over memory BIOs):
the transport feeds it bytes and sends what it produces, which is how TLS is
composed over a TCP connection that may have carried cleartext first (the
upgrade path) and how a saved session is offered for resumption.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import ipaddress
import logging
import ssl

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from agent.errors import CertificateRejected
from agent.model import Auth, AuthSource, AuthSpec, IPAddress, Profile, TLSInfo

LOG = logging.getLogger(__name__)

ALPN_DOT = "dot"


def client_context(*, verify: bool, ca_file: str | None = None) -> ssl.SSLContext:
    """A TLS >= 1.2 client context offering ALPN "dot".

    With `verify`, OpenSSL validates the chain against `ca_file` (or the system
    bundle); names and addresses are checked afterwards by `authenticate`, so
    that the result can say which identity matched.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    if verify:
        ctx.verify_mode = ssl.CERT_REQUIRED
        if ca_file:
            ctx.load_verify_locations(cafile=ca_file)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        ctx.verify_mode = ssl.CERT_NONE
    ctx.set_alpn_protocols([ALPN_DOT])
    return ctx


def needs_chain_validation(spec: AuthSpec) -> bool:
    """Strict without pins authenticates through the CA chain."""
    return spec.profile is Profile.STRICT and not spec.pins


@functools.lru_cache(maxsize=32)
def _cached_context(verify: bool, ca_file: str | None) -> ssl.SSLContext:
    return client_context(verify=verify, ca_file=ca_file)


def context_for(spec: AuthSpec) -> ssl.SSLContext:
    """The (shared, cached) client context for a resolver's AuthSpec.

    Shared contexts matter: OpenSSL keeps its client session cache per context.
    An unreadable CA file is the resolver's failure to authenticate, with the reason.
    """
    try:
        return _cached_context(needs_chain_validation(spec), spec.ca_file)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateRejected(f"CA file {spec.ca_file}: {exc}") from exc


def check_peer(tls: TLSEngine, address: str, spec: AuthSpec) -> TLSInfo:
    """After the handshake: how the server authenticated; raises CertificateRejected
    when the profile does not accept it (nothing must be sent to it then)."""
    try:
        cert = tls.peer_cert()
        auth, why = authenticate(cert, address, spec, chain_valid=needs_chain_validation(spec))
        pin = spki_pin(cert)
    except (ssl.SSLError, ValueError) as exc:
        raise CertificateRejected(f"unusable server certificate: {exc}") from exc
    info = TLSInfo(
        version=tls.version,
        cipher=tls.cipher,
        pin=pin,
        auth=auth,
        alpn=tls.alpn,
        auth_source=auth_source(auth, spec),
    )
    if not accepted(auth, spec):
        raise CertificateRejected(why, info)
    return info


def warm_up() -> None:
    """Load what the first certificate check would otherwise load mid-handshake.

    The first public-key operation of `cryptography` in a process costs ~8 ms, and
    the first context ~2 ms: paid at start, not on the first connection.
    """
    from cryptography.hazmat.primitives.asymmetric import ec  # noqa: PLC0415

    key = ec.generate_private_key(ec.SECP256R1()).public_key()
    key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    _cached_context(False, None)


def spki_pin(cert_der: bytes) -> str:
    """The RFC 7858 pin: base64 of SHA-256 over the DER SubjectPublicKeyInfo."""
    cert = x509.load_der_x509_certificate(cert_der)
    spki = cert.public_key().public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode("ascii")


def _san(cert: x509.Certificate) -> x509.SubjectAlternativeName | None:
    try:
        return cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return None


def cert_ip_addresses(cert_der: bytes) -> list[IPAddress]:
    san = _san(x509.load_der_x509_certificate(cert_der))
    if san is None:
        return []
    return [
        ip
        for ip in san.get_values_for_type(x509.IPAddress)
        if not isinstance(ip, (ipaddress.IPv4Network, ipaddress.IPv6Network))
    ]


def cert_dns_names(cert_der: bytes) -> list[str]:
    san = _san(x509.load_der_x509_certificate(cert_der))
    return [] if san is None else list(san.get_values_for_type(x509.DNSName))


def name_matches(pattern: str, name: str) -> bool:
    """RFC 6125 matching: case-insensitive, a wildcard only as the whole left-most label."""
    pattern = pattern.rstrip(".").lower()
    name = name.rstrip(".").lower()
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    first, _, rest = name.partition(".")
    return bool(first) and rest == pattern[2:] and "." in rest


def ip_in_cert(cert_der: bytes, address: str) -> bool:
    want = ipaddress.ip_address(address)
    return any(ip == want for ip in cert_ip_addresses(cert_der))


def authenticate(
    cert_der: bytes, address: str, spec: AuthSpec, *, chain_valid: bool
) -> tuple[Auth, str]:
    """Decide how (and whether) the certificate authenticated the resolver at `address`.

    Returns the Auth and a reason text (empty when authenticated). `chain_valid`
    says OpenSSL validated the chain during the handshake. Configuration first: the
    pins decide when there are any; else a configured name must be in the
    certificate, and the address in it does not stand in for the name (the network
    chose the address); only then the address, or a name the network handed out.
    """
    pin = spki_pin(cert_der)
    if spec.pins:
        if pin in spec.pins:
            return Auth.PIN, ""
        return Auth.NONE, f"pin {pin} is not in the configured pin set"
    if not chain_valid:
        return Auth.NONE, "certificate chain was not validated"
    if spec.auth_name and any(name_matches(n, spec.auth_name) for n in cert_dns_names(cert_der)):
        return Auth.NAME, ""
    if spec.name_configured:
        return Auth.NONE, (
            f"certificate does not name {spec.auth_name}, the configured name "
            "(its IP address does not authenticate when a name is configured)"
        )
    if ip_in_cert(cert_der, address):
        return Auth.IP_SAN, ""
    wanted = f"{address} or {spec.auth_name}" if spec.auth_name else address
    return Auth.NONE, f"certificate does not name {wanted}"


def auth_source(auth: Auth, spec: AuthSpec) -> AuthSource | None:
    """Where the identity that authenticated came from: pins are always configured."""
    if auth is Auth.PIN:
        return AuthSource.CONFIGURED
    if auth is Auth.NAME:
        return spec.name_source
    if auth is Auth.IP_SAN:
        return spec.address_source
    return None


def accepted(auth: Auth, spec: AuthSpec) -> bool:
    """Whether the profile accepts a TLS session authenticated by `auth`."""
    return not spec.profile.requires_auth or auth is not Auth.NONE


class TLSEngine:
    """A TLS client without I/O: feed it what the peer sent, send what it has for the peer."""

    def __init__(
        self,
        ctx: ssl.SSLContext,
        *,
        server_hostname: str | None = None,
        session: ssl.SSLSession | None = None,
    ) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self.obj = ctx.wrap_bio(
            self._incoming, self._outgoing, server_hostname=server_hostname, session=session
        )
        self.peer_closed = False

    def handshake(self) -> bool:
        """Advance the handshake; True once it is complete. Raises ssl.SSLError on failure."""
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            return False
        return True

    def feed(self, data: bytes) -> None:
        if data:
            self._incoming.write(data)
        else:
            self._incoming.write_eof()

    def data_to_send(self) -> bytes:
        return self._outgoing.read()

    def encrypt(self, data: bytes) -> None:
        self.obj.write(data)

    def decrypt(self) -> bytes:
        """All application data available now (b"" when none).

        A close_notify, or the transport's EOF without one, sets `peer_closed`;
        data that came before it is still returned.
        """
        chunks: list[bytes] = []
        while not self.peer_closed:
            try:
                chunk = self.obj.read(262144)
            except ssl.SSLWantReadError:
                break
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                chunk = b""
            if not chunk:
                self.peer_closed = True
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def close_notify(self) -> None:
        with contextlib.suppress(ssl.SSLError):  # includes SSLWantReadError
            self.obj.unwrap()

    def peer_cert(self) -> bytes:
        der = self.obj.getpeercert(binary_form=True)
        if not der:
            raise ssl.SSLError("peer sent no certificate")
        return der

    @property
    def version(self) -> str:
        return self.obj.version() or ""

    @property
    def cipher(self) -> str:
        c = self.obj.cipher()
        return c[0] if c else ""

    @property
    def alpn(self) -> str | None:
        return self.obj.selected_alpn_protocol()

    @property
    def session(self) -> ssl.SSLSession | None:
        return self.obj.session

    @property
    def session_reused(self) -> bool:
        return self.obj.session_reused
