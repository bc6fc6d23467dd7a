"""The cluster CA the controller runs: made on first start (key mode 600 in
the state directory) or the site's own (KSCOPE_TLS_CA_CERT / _KEY), and the
controller's own certificate, signed by it and renewed before it expires."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from collections.abc import Sequence
from pathlib import Path

from kscope_common.pki import (
    CONTROLLER_DNS_NAME,
    CertificateAuthority,
    Identity,
    PkiError,
    Role,
    fingerprint,
    key_pem,
    make_ca,
    new_private_key,
)
from kscope_common.tls import ProcessCertificate, renew_at

log = logging.getLogger(__name__)


class CAError(Exception):
    """The CA cannot be loaded or made; the message names the setting or file."""


def write_private(path: Path, data: bytes) -> None:
    """Write a secret file: mode 600 from its first byte, in a 700 directory."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def load_or_create_ca(
    tls_dir: Path, cert_path: Path | None, key_path: Path | None
) -> CertificateAuthority:
    """The site's CA when both files are given, else the one in `tls_dir`
    (made on first start)."""
    if (cert_path is None) != (key_path is None):
        raise CAError("set both KSCOPE_TLS_CA_CERT and KSCOPE_TLS_CA_KEY, or neither")
    if cert_path is not None and key_path is not None:
        try:
            ca = CertificateAuthority.from_pem(cert_path.read_bytes(), key_path.read_bytes())
        except OSError as exc:
            raise CAError(f"cannot read the CA: {exc.filename}: {exc.strerror}") from exc
        except PkiError as exc:
            raise CAError(f"KSCOPE_TLS_CA_CERT/KSCOPE_TLS_CA_KEY: {exc}") from exc
        _publish(tls_dir, ca)
        return ca
    cert_file, key_file = tls_dir / "ca.pem", tls_dir / "ca-key.pem"
    if key_file.exists():
        try:
            return CertificateAuthority.from_pem(cert_file.read_bytes(), key_file.read_bytes())
        except (OSError, PkiError) as exc:
            raise CAError(f"the CA in {tls_dir} is unusable: {exc}") from exc
    cert, key = make_ca()
    write_private(key_file, key)
    ca = CertificateAuthority.from_pem(cert, key)
    _publish(tls_dir, ca)
    log.info("made a new cluster CA in %s (fingerprint %s)", tls_dir, fingerprint(ca.cert)[:16])
    return ca


def _publish(tls_dir: Path, ca: CertificateAuthority) -> None:
    """ca.pem beside the state: public (operators copy it), never the key."""
    tls_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = tls_dir / "ca.pem"
    if not path.exists() or path.read_bytes() != ca.cert_pem:
        path.write_bytes(ca.cert_pem)
        path.chmod(0o644)


class ClusterCA:
    """Signs the certificates of every KScope process, the controller's own too."""

    def __init__(self, ca: CertificateAuthority, lifetime_s: float, server_names: Sequence[str]):
        self.ca = ca
        self.lifetime_s = lifetime_s
        self._dns, self._ips = _split_names(server_names)

    @property
    def cert_pem(self) -> bytes:
        return self.ca.cert_pem

    def sign_csr(self, csr_pem: bytes, identity: Identity, dns_names: Sequence[str]) -> bytes:
        return self.ca.sign_csr(csr_pem, identity, self.lifetime_s, dns_names)

    def issue_direct(self, identity: Identity) -> ProcessCertificate:
        """A key and certificate made here, for a process this one runs (its own
        server, or the facade of `kscope serve`)."""
        key = new_private_key()
        dns, ips = (
            ([CONTROLLER_DNS_NAME, *self._dns], self._ips)
            if identity.role is Role.CONTROLLER
            else ((), ())
        )
        cert = self.ca.issue(key.public_key(), identity, self.lifetime_s, dns, ips)
        return ProcessCertificate(self.cert_pem, key_pem(key), cert)

    async def keep_renewed(self, certificate: ProcessCertificate) -> None:
        """Renew a directly issued certificate two thirds into each lifetime."""
        while True:
            await asyncio.sleep(max(0.0, renew_at(certificate.cert_pem) - time.time()))
            fresh = self.issue_direct(certificate.identity)
            certificate.replace(fresh.key_pem, fresh.cert_pem)
            log.info("renewed the certificate of %s", certificate.identity)


def _split_names(names: Sequence[str]) -> tuple[list[str], list[str]]:
    import ipaddress

    dns: list[str] = ["localhost", socket.gethostname(), socket.getfqdn()]
    ips: list[str] = ["127.0.0.1", "::1"]
    for name in names:
        if not name or name in ("0.0.0.0", "::"):
            continue
        try:
            ipaddress.ip_address(name)
        except ValueError:
            dns.append(name)
        else:
            ips.append(name)
    return list(dict.fromkeys(dns)), list(dict.fromkeys(ips))
