"""The X.509 work of KScope's cluster CA, all through the `cryptography` package.

Identities live in one SAN URI per certificate, `spiffe://kscope/<role>/<name>`
(an agent's name is `instance/<id>` or `host/<name>`), and the enrollment that
produced the certificate in a second one, `urn:kscope:enrollment:<id>`, so
revoking an enrollment (a facade, a host) refuses every certificate it led to.
Keys are ECDSA P-256: small, and fast to handshake.
"""

from __future__ import annotations

import datetime
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_PREFIX = "spiffe://kscope/"
ENROLLMENT_PREFIX = "urn:kscope:enrollment:"
AGENT_DNS_SUFFIX = ".agent.kscope"
CONTROLLER_DNS_NAME = "controller.kscope"
"""Every controller certificate carries this name; processes that enrolled
verify the controller against it, whatever address they dial."""
CLOCK_SKEW_S = 300
"""Certificates start this long before they are issued, for clocks that differ."""
_CLOCK_SKEW = datetime.timedelta(seconds=CLOCK_SKEW_S)


class Role(StrEnum):
    CONTROLLER = "controller"
    """The control plane; also the CA."""
    FACADE = "facade"
    """The HTTP front door: may call agents and read the control plane."""
    AGENT = "agent"
    """A node agent, for one instance (`instance/<id>`) or one host (`host/<name>`)."""
    OPERATOR = "operator"
    """A person or script with operator rights (like an admin key)."""


class PkiError(ValueError):
    """A certificate, key or CSR that cannot be used; the message says why."""


@dataclass(frozen=True)
class Identity:
    """Who a certificate speaks for."""

    role: Role
    name: str
    enrollment: str = ""
    """The enrollment (token id) the certificate came from; '' for the controller's own."""

    @property
    def uri(self) -> str:
        return f"{SPIFFE_PREFIX}{self.role.value}/{self.name}"

    @property
    def instance_id(self) -> str:
        """The instance an agent identity is bound to, or ''."""
        kind, _, rest = self.name.partition("/")
        return rest if self.role is Role.AGENT and kind == "instance" else ""

    @property
    def host(self) -> str:
        """The host a host agent identity is bound to, or ''."""
        kind, _, rest = self.name.partition("/")
        return rest if self.role is Role.AGENT and kind == "host" else ""

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, uri: str, enrollment: str = "") -> Identity:
        """The identity a SAN URI names; PkiError when it names none."""
        if not uri.startswith(SPIFFE_PREFIX):
            raise PkiError(f"{uri!r} is not a KScope identity")
        role_text, _, name = uri[len(SPIFFE_PREFIX) :].partition("/")
        try:
            role = Role(role_text)
        except ValueError:
            raise PkiError(f"{uri!r} names no KScope role") from None
        if not name:
            raise PkiError(f"{uri!r} names no one")
        return cls(role, name, enrollment)


def agent_instance(instance_id: str) -> Identity:
    return Identity(Role.AGENT, f"instance/{instance_id}")


def agent_host(host: str) -> Identity:
    return Identity(Role.AGENT, f"host/{host}")


def agent_server_name(identity_uri: str) -> str:
    """The DNS name an agent's certificate carries and facades verify: a hash of
    its identity, since instance ids may hold characters a host name may not."""
    return hashlib.sha256(identity_uri.encode()).hexdigest()[:32] + AGENT_DNS_SUFFIX


def new_private_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def load_key(pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError) as exc:
        raise PkiError(f"not a usable private key: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise PkiError("the CA key must be an EC key")
    return key


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def load_cert(pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate: {exc}") from exc


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def make_ca(common_name: str = "KScope cluster CA", days: int = 3650) -> tuple[bytes, bytes]:
    """A new self-signed CA: (certificate PEM, private key PEM)."""
    key = new_private_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert_pem(cert), key_pem(key)


def make_csr(key: ec.EllipticCurvePrivateKey, identity: Identity) -> bytes:
    """A CSR naming `identity`; the CA checks it asks for nothing else."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.uri[-64:])]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity.uri)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def csr_identity(csr_pem: bytes) -> tuple[x509.CertificateSigningRequest, str]:
    """The parsed CSR and the one identity URI it asks for; PkiError otherwise."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise PkiError(f"not a PEM certificate request: {exc}") from exc
    if not csr.is_signature_valid:
        raise PkiError("the certificate request's signature does not verify")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the certificate request names no identity (no SAN URI)") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1 or len(san) != 1:
        raise PkiError("the certificate request must name exactly one identity and nothing else")
    return csr, uris[0]


@dataclass(frozen=True)
class CertificateAuthority:
    """Signs certificates with the cluster CA's key."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @classmethod
    def from_pem(cls, cert_pem_bytes: bytes, key_pem_bytes: bytes) -> CertificateAuthority:
        cert = load_cert(cert_pem_bytes)
        key = load_key(key_pem_bytes)
        spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        if cert.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
            raise PkiError("the CA key does not belong to the CA certificate")
        try:
            constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        except x509.ExtensionNotFound:
            constraints = None
        if constraints is None or not constraints.ca:
            raise PkiError("the CA certificate is not a CA (basicConstraints CA:TRUE missing)")
        return cls(cert, key)

    @property
    def cert_pem(self) -> bytes:
        return cert_pem(self.cert)

    def issue(
        self,
        public_key: ec.EllipticCurvePublicKey | object,
        identity: Identity,
        lifetime_s: float,
        dns_names: Sequence[str] = (),
        ip_addresses: Sequence[str] = (),
    ) -> bytes:
        """A leaf certificate for `identity` (client and server use), PEM."""
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise PkiError("only EC (P-256) keys are accepted")
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(identity.uri)]
        if identity.enrollment:
            sans.append(x509.UniformResourceIdentifier(ENROLLMENT_PREFIX + identity.enrollment))
        sans += [x509.DNSName(name) for name in dict.fromkeys(dns_names)]
        for text in dict.fromkeys(ip_addresses):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(text)))
            except ValueError:
                continue
        now = _now()
        # Never past the CA's own end: a chain must verify for the whole lifetime.
        not_after = min(now + datetime.timedelta(seconds=lifetime_s), self.cert.not_valid_after_utc)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity.uri[-64:])]))
            .issuer_name(self.cert.subject)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage(
                    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
                ),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )
        return cert_pem(cert)

    def sign_csr(
        self,
        csr_pem: bytes,
        identity: Identity,
        lifetime_s: float,
        dns_names: Sequence[str] = (),
    ) -> bytes:
        """Sign a CSR for exactly `identity`: a CSR asking for another is refused."""
        csr, asked = csr_identity(csr_pem)
        if asked != identity.uri:
            raise PkiError(
                f"the certificate request asks for {asked}, "
                f"but this enrollment is for {identity.uri}"
            )
        return self.issue(csr.public_key(), identity, lifetime_s, dns_names)


def identity_of(cert: x509.Certificate) -> Identity:
    """The KScope identity (and enrollment) a certificate speaks for."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise PkiError("the certificate names no identity") from None
    return identity_from_uris(san.get_values_for_type(x509.UniformResourceIdentifier))


def identity_from_uris(uris: Sequence[str]) -> Identity:
    """The identity (and enrollment) a certificate's SAN URIs name: the one
    parser for certificates here and for the peer URIs a TLS handshake reports."""
    enrollment = next(
        (u[len(ENROLLMENT_PREFIX) :] for u in uris if u.startswith(ENROLLMENT_PREFIX)), ""
    )
    spiffe = [u for u in uris if u.startswith(SPIFFE_PREFIX)]
    if len(spiffe) != 1:
        raise PkiError("the certificate must name exactly one KScope identity")
    return Identity.parse(spiffe[0], enrollment)


def not_after(cert_pem_bytes: bytes) -> float:
    """When a certificate expires, epoch seconds."""
    return load_cert(cert_pem_bytes).not_valid_after_utc.timestamp()


def not_before(cert_pem_bytes: bytes) -> float:
    return load_cert(cert_pem_bytes).not_valid_before_utc.timestamp()
