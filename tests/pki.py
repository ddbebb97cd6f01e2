"""Throw-away certificates made with openssl: the e2e cluster's, and the peer channel's in the
integration tests.

One throw-away CA signs everything; keys are EC P-256 (fast to generate on a 2-core machine).
The identities are the ones the Node authorizer and the default RBAC roles expect.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

_DAYS = "2"


@dataclass(frozen=True)
class KeyPair:
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def _ec_key(path: Path) -> None:
    _openssl("ecparam", "-genkey", "-name", "prime256v1", "-noout", "-out", str(path))
    path.chmod(0o600)


class Pki:
    """Creates a CA in directory and signs leaf certificates with it."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ca = KeyPair(self.dir / "ca.crt", self.dir / "ca.key")
        _ec_key(self.ca.key)
        _openssl(
            "req",
            "-x509",
            "-new",
            "-sha256",
            "-days",
            _DAYS,
            "-key",
            str(self.ca.key),
            "-out",
            str(self.ca.cert),
            "-subj",
            "/CN=nodelocal-e2e-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign,digitalSignature",
        )
        self._serial = 1

    def issue(
        self,
        name: str,
        common_name: str,
        organization: str | None = None,
        dns: tuple[str, ...] = (),
        ips: tuple[str, ...] = (),
        server: bool = False,
    ) -> KeyPair:
        pair = KeyPair(self.dir / f"{name}.crt", self.dir / f"{name}.key")
        csr = self.dir / f"{name}.csr"
        ext = self.dir / f"{name}.ext"
        _ec_key(pair.key)
        subject = f"/CN={common_name}" + (f"/O={organization}" if organization else "")
        _openssl(
            "req", "-new", "-sha256", "-key", str(pair.key), "-out", str(csr), "-subj", subject
        )
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature,keyEncipherment",
            f"extendedKeyUsage={'serverAuth,clientAuth' if server else 'clientAuth'}",
        ]
        sans = [f"DNS:{d}" for d in dns] + [f"IP:{i}" for i in ips]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        self._serial += 1
        _openssl(
            "x509",
            "-req",
            "-sha256",
            "-days",
            _DAYS,
            "-in",
            str(csr),
            "-CA",
            str(self.ca.cert),
            "-CAkey",
            str(self.ca.key),
            "-set_serial",
            str(self._serial),
            "-extfile",
            str(ext),
            "-out",
            str(pair.cert),
        )
        csr.unlink()
        ext.unlink()
        return pair

    def service_account_keys(self) -> KeyPair:
        """The token signing key pair (``cert`` holds the public key here)."""
        pair = KeyPair(self.dir / "sa.pub", self.dir / "sa.key")
        _ec_key(pair.key)
        _openssl("ec", "-in", str(pair.key), "-pubout", "-out", str(pair.cert))
        return pair


def write_kubeconfig(path: Path, server: str, ca: Path, client: KeyPair, user: str) -> Path:
    """A kubeconfig pointing at files (no embedded data: the files live as long as the cluster)."""
    path.write_text(
        f"""apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: {server}
    certificate-authority: {ca}
users:
- name: {user}
  user:
    client-certificate: {client.cert}
    client-key: {client.key}
contexts:
- name: e2e
  context: {{cluster: e2e, user: {user}}}
current-context: e2e
"""
    )
    path.chmod(0o600)
    return path
