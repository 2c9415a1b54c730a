#!/usr/bin/env python
"""Certificates and keys for a real deployment: TLS for the coordinator, EC keys for hospitals.

    # at the coordinator: a private CA and a server certificate for the names sites will dial
    python launch/certs.py server --host coordinator.example.org --host 10.20.30.40 --out certs/

    # at each hospital: the SuperNode's identity key (send only the .pub to the coordinator)
    python launch/certs.py node-key --name chexpert --out keys/

`server` writes certs/ca.pem (give this one to every hospital), certs/ca.key (keep it secret and
offline if you can), certs/server.pem and certs/server.key. The CA is reused if it exists, so a
new server certificate for a new host name does not invalidate what the hospitals hold. The server
certificate always also names localhost, 127.0.0.1 and ::1: the SuperLink's own helper processes
connect to it over loopback and verify it too.

`node-key` writes keys/<name> (OpenSSH private key, P-384, mode 0600: it never leaves the
hospital) and keys/<name>.pub (the public key the coordinator registers).
"""
from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import re
import sys
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from chestfed.common.atomic import write_bytes

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
# A site name is a file name here (keys/<name>) and at the site (site-<name>/): the same rule as
# site names in the experiment config (common/config/__init__.py).
SITE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def bad_site_name(name: str) -> str | None:
    """Why `name` cannot be a site name, or None."""
    if SITE_NAME.fullmatch(name):
        return None
    return f"--name {name!r}: a site name is letters, digits, '_', '.', '-' (it names files)"


def _write(path: Path, data: bytes, secret: bool = False) -> Path:
    """Atomic write; secrets are created 0600 from the start."""
    return write_bytes(path, data, secret=secret)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for h in dict.fromkeys(hosts):  # keep order, drop duplicates
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(h)))
        except ValueError:
            names.append(x509.DNSName(h))
    return x509.SubjectAlternativeName(names)


def make_ca(out: Path, name: str = "ChestFed coordinator CA", days: int = 3650) -> tuple[Path, Path]:
    """Create (or reuse) `out/ca.pem` + `out/ca.key`."""
    cert_path, key_path = out / "ca.pem", out / "ca.key"
    if cert_path.is_file() and key_path.is_file():
        return cert_path, key_path
    key = ec.generate_private_key(ec.SECP384R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA384()))
    _write(key_path, _key_pem(key), secret=True)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    return cert_path, key_path


def make_server_cert(out: Path, hosts: list[str], days: int = 825) -> dict[str, Path]:
    """A server certificate for `hosts` (+ loopback), signed by the CA in `out` (made if missing).

    Returns {"ca": ca.pem, "cert": server.pem, "key": server.key}.
    """
    ca_cert_path, ca_key_path = make_ca(out)
    ca_cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
    ca_key = serialization.load_pem_private_key(ca_key_path.read_bytes(), None)
    all_hosts = [h for h in hosts if h] + list(LOOPBACK_NAMES)
    key = ec.generate_private_key(ec.SECP384R1())
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, all_hosts[0])]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(_san(all_hosts), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()),
                           critical=False)
            .sign(ca_key, hashes.SHA384()))
    key_path = _write(out / "server.key", _key_pem(key), secret=True)
    cert_path = _write(out / "server.pem", cert.public_bytes(serialization.Encoding.PEM))
    return {"ca": ca_cert_path, "cert": cert_path, "key": key_path}


def make_node_key(out: Path, name: str, overwrite: bool = False) -> tuple[Path, Path]:
    """A SuperNode identity: `out/<name>` (OpenSSH EC P-384 private key) and `out/<name>.pub`."""
    priv, pub = out / name, out / f"{name}.pub"
    if priv.exists() and not overwrite:
        if not pub.exists():  # re-derive a lost public half
            key = serialization.load_ssh_private_key(priv.read_bytes(), None)
            _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                      serialization.PublicFormat.OpenSSH) + b"\n")
        return priv, pub
    key = ec.generate_private_key(ec.SECP384R1())
    _write(priv, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                   serialization.NoEncryption()), secret=True)
    _write(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                              serialization.PublicFormat.OpenSSH) + f" {name}\n".encode())
    return priv, pub


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="certs.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("server", help="CA (made once) + server certificate for the coordinator")
    s.add_argument("--host", action="append", default=[],
                   help="a DNS name or IP address the hospitals use to reach the coordinator "
                        "(repeat for several); loopback is always added")
    s.add_argument("--out", default="certs", help="folder (default: certs/)")
    s.add_argument("--days", type=int, default=825, help="server certificate lifetime")
    n = sub.add_parser("node-key", help="EC key pair identifying one hospital's SuperNode")
    n.add_argument("--name", required=True, help="the site name, e.g. chexpert")
    n.add_argument("--out", default="keys", help="folder (default: keys/)")
    n.add_argument("--overwrite", action="store_true", help="replace an existing key")
    args = p.parse_args(argv)
    if args.cmd == "server":
        paths = make_server_cert(Path(args.out), args.host, args.days)
        print(f"CA certificate (give to every hospital): {paths['ca']}")
        print(f"CA private key (keep secret):           {Path(args.out) / 'ca.key'}")
        print(f"server certificate + key:               {paths['cert']}, {paths['key']}")
        print(f"valid for: {', '.join(dict.fromkeys(args.host + list(LOOPBACK_NAMES)))}")
    else:
        why = bad_site_name(args.name)
        if why:
            print(f"chestfed: {why}", file=sys.stderr)
            return 2
        priv, pub = make_node_key(Path(args.out), args.name, args.overwrite)
        print(f"private key (stays at this hospital, mode 0600): {priv}")
        print(f"public key (send to the coordinator):            {pub}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
