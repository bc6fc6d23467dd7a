"""The cluster CA's X.509 work (kscope_common.pki) and enrollment token parsing:
what a certificate says about its holder is exactly what the CA was asked to sign."""

from __future__ import annotations

import datetime
import hashlib

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID

from kscope_common.pki import (
    AGENT_DNS_SUFFIX,
    CertificateAuthority,
    Identity,
    PkiError,
    Role,
    agent_host,
    agent_instance,
    agent_server_name,
    csr_identity,
    identity_of,
    key_pem,
    load_cert,
    make_ca,
    make_csr,
    new_private_key,
)
from kscope_common.tls import EnrollmentError, token_identity

pytestmark = pytest.mark.security

FACADE = Identity(Role.FACADE, "edge-1", "enr0001")


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    cert, key = make_ca()
    return CertificateAuthority.from_pem(cert, key)


def test_make_ca_is_a_ca_that_loads_back(ca: CertificateAuthority) -> None:
    constraints = ca.cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    assert constraints.ca and constraints.path_length == 0
    again = CertificateAuthority.from_pem(ca.cert_pem, key_pem(ca.key))
    assert again.cert == ca.cert


def test_ca_key_of_another_ca_is_refused(ca: CertificateAuthority) -> None:
    _, other_key = make_ca()
    with pytest.raises(PkiError, match="does not belong"):
        CertificateAuthority.from_pem(ca.cert_pem, other_key)


def test_leaf_certificate_cannot_be_loaded_as_ca(ca: CertificateAuthority) -> None:
    key = new_private_key()
    leaf = ca.issue(key.public_key(), FACADE, 3600)
    with pytest.raises(PkiError, match="not a CA"):
        CertificateAuthority.from_pem(leaf, key_pem(key))


def test_garbage_pem_is_refused() -> None:
    with pytest.raises(PkiError):
        load_cert(b"-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    with pytest.raises(PkiError):
        CertificateAuthority.from_pem(b"not a cert", b"not a key")


def test_sign_csr_for_the_right_identity(ca: CertificateAuthority) -> None:
    key = new_private_key()
    dns = agent_server_name(agent_instance("i-1").uri)
    agent = Identity(Role.AGENT, "instance/i-1", "enr0002")
    pem = ca.sign_csr(make_csr(key, agent), agent, 3600, [dns])
    cert = load_cert(pem)
    cert.verify_directly_issued_by(ca.cert)
    assert identity_of(cert) == agent
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [dns]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(usage) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    lifetime = cert.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(minutes=59) < lifetime <= datetime.timedelta(hours=1)


def test_csr_for_another_identity_is_refused(ca: CertificateAuthority) -> None:
    key = new_private_key()
    wanted = agent_instance("victim")
    with pytest.raises(PkiError, match="asks for"):
        ca.sign_csr(make_csr(key, wanted), agent_host("mac-1"), 3600)
    with pytest.raises(PkiError, match="asks for"):
        ca.sign_csr(make_csr(key, Identity(Role.OPERATOR, "edge-1")), FACADE, 3600)


def test_csr_naming_two_identities_is_refused(ca: CertificateAuthority) -> None:
    key = new_private_key()
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.UniformResourceIdentifier(FACADE.uri),
                    x509.UniformResourceIdentifier(Identity(Role.OPERATOR, "root").uri),
                ]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
        .public_bytes(serialization.Encoding.PEM)
    )
    with pytest.raises(PkiError, match="exactly one"):
        csr_identity(csr)
    with pytest.raises(PkiError):
        ca.sign_csr(csr, FACADE, 3600)


def test_identity_of_round_trip_keeps_the_enrollment(ca: CertificateAuthority) -> None:
    for identity in (
        FACADE,
        Identity(Role.OPERATOR, "ops", "enr0003"),
        Identity(Role.AGENT, "host/mac-1", "enr0004"),
        Identity(Role.CONTROLLER, "ctl"),  # the controller's own: no enrollment
    ):
        key = new_private_key()
        cert = load_cert(ca.issue(key.public_key(), identity, 60))
        assert identity_of(cert) == identity
        assert identity_of(cert).enrollment == identity.enrollment


def test_identity_accessors() -> None:
    assert agent_instance("i-9").instance_id == "i-9" and agent_instance("i-9").host == ""
    assert agent_host("mac").host == "mac" and agent_host("mac").instance_id == ""
    assert FACADE.instance_id == "" and FACADE.host == ""
    assert FACADE.uri == "spiffe://kscope/facade/edge-1"
    assert Identity.parse("spiffe://kscope/agent/instance/i-9") == agent_instance("i-9")
    for bad in ("spiffe://other/facade/x", "spiffe://kscope/root/x", "spiffe://kscope/facade/"):
        with pytest.raises(PkiError):
            Identity.parse(bad)


def test_certificate_without_identity_is_refused(ca: CertificateAuthority) -> None:
    key = new_private_key()
    with pytest.raises(PkiError, match="no identity"):
        identity_of(ca.cert)
    cert = load_cert(ca.issue(key.public_key(), FACADE, 60))
    assert identity_of(cert).role is Role.FACADE


@pytest.mark.parametrize(
    ("token", "identity"),
    [
        ("kse1.facade.edge-1.s3cr3t", Identity(Role.FACADE, "edge-1")),
        ("kse1.operator.ops.s3cr3t", Identity(Role.OPERATOR, "ops")),
        ("kse1.instance.i-1.s3cr3t", agent_instance("i-1")),
        ("kse1.host.mac.local.s3cr3t", agent_host("mac.local")),  # dots in the name
    ],
)
def test_token_identity(token: str, identity: Identity) -> None:
    assert token_identity(token) == identity


@pytest.mark.parametrize(
    "token",
    [
        "",
        "ks-abcdef",
        "kse1",
        "kse1.facade",
        "kse1.facade.edge-1",  # no secret
        "kse2.facade.edge-1.s3cr3t",
        "kse1.root.edge-1.s3cr3t",  # no such kind
        "kse1.controller-ish.x.s3cr3t",
    ],
)
def test_malformed_token_is_refused(token: str) -> None:
    with pytest.raises(EnrollmentError):
        token_identity(token)


def test_agent_server_name_is_stable_and_a_dns_name() -> None:
    uri = agent_instance("inst/with:odd chars").uri
    name = agent_server_name(uri)
    assert name == agent_server_name(uri)
    assert name.endswith(AGENT_DNS_SUFFIX)
    label = name.removesuffix(AGENT_DNS_SUFFIX)
    assert len(label) == 32 and all(c in "0123456789abcdef" for c in label)
    assert agent_server_name(agent_instance("a").uri) != agent_server_name(agent_instance("b").uri)
    # Pinned: facades and agents of different versions must agree on it.
    assert agent_server_name("spiffe://kscope/agent/instance/x") == (
        hashlib.sha256(b"spiffe://kscope/agent/instance/x").hexdigest()[:32] + ".agent.kscope"
    )
