"""TLS files: the server's certificate and key checked at start (so that a wrong file is one line naming its
flag, not gRPC's "Failed to bind to address"), and the credentials of the `rater-server health` probe."""

from __future__ import annotations

import ipaddress
import ssl
from pathlib import Path

from noiserater.server.config import ConfigError


def _read_pem(flag: str, path: str, marker: str, what: str) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path} ({exc.strerror or type(exc).__name__})") from None
    if "-----BEGIN" not in text or marker not in text:
        raise ConfigError(f"{flag}: {path} holds no PEM {what}")
    return text


def check_server_pair(cert: str, key: str) -> None:
    """Load the certificate chain and its private key as a TLS server would; ConfigError when either cannot be
    read or the key does not belong to the certificate."""
    _read_pem("--tls-cert", cert, "CERTIFICATE-----", "certificate")
    key_text = _read_pem("--tls-key", key, "PRIVATE KEY-----", "private key")
    if "ENCRYPTED" in key_text:
        raise ConfigError(f"--tls-key: {key} is encrypted; the server needs an unencrypted private key")
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cafile=cert)
    except ssl.SSLError as exc:
        raise ConfigError(f"--tls-cert: {cert} cannot be read as a PEM certificate ({exc.reason or exc})") from None
    try:
        context.load_cert_chain(cert, key, password=lambda: b"")
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ConfigError(f"--tls-key: {key} does not match the certificate in --tls-cert {cert}") from None
        raise ConfigError(f"--tls-key: {key} cannot be read as a PEM private key ({exc.reason or exc})") from None


def certificate_names(cert: str) -> list[str]:
    """The names the first certificate of a PEM file is valid for: its subject alternative names (DNS names,
    then IP addresses), else its common name; [] when the file holds no readable certificate. Read from the
    DER encoding directly: the ssl module decodes only CA certificates, and a server's usually is not one."""
    try:
        text = Path(cert).read_text(errors="replace")
        body = text.split("-----BEGIN CERTIFICATE-----", 1)[1].split("-----END CERTIFICATE-----", 1)[0]
        der = ssl.PEM_cert_to_DER_cert(f"-----BEGIN CERTIFICATE-----{body}-----END CERTIFICATE-----\n")
        return _names(der)
    except (OSError, IndexError, ValueError, StopIteration):
        return []


SUBJECT_ALT_NAME = b"\x55\x1d\x11"  # OID 2.5.29.17
COMMON_NAME = b"\x55\x04\x03"  # OID 2.5.4.3


def _names(der: bytes) -> list[str]:
    tbs = next(_children(_der(der)[1]))[1]  # Certificate ::= SEQUENCE { tbsCertificate, ... }
    fields = list(_children(tbs))
    dns, ips = [], []
    for tag, value in fields:
        if tag != 0xA3:  # [3] extensions
            continue
        for _, extension in _children(_der(value)[1]):
            parts = list(_children(extension))  # extnID, [critical], extnValue
            if parts[0] != (0x06, SUBJECT_ALT_NAME):
                continue
            for kind, name in _children(_der(parts[-1][1])[1]):
                if kind == 0x82:  # dNSName
                    dns.append(name.decode("ascii", "replace"))
                elif kind == 0x87:  # iPAddress
                    ips.append(str(ipaddress.ip_address(name)))
    if dns or ips:
        return dns + ips
    # tbsCertificate: [0] version, serial, signature, issuer, validity, subject, ...: the fourth SEQUENCE
    subject = [value for tag, value in fields if tag == 0x30][3]
    names = []
    for _, rdn in _children(subject):
        for _, attribute in _children(rdn):
            oid, value = (v for _, v in _children(attribute))
            if oid == COMMON_NAME:
                names.append(value.decode("utf-8", "replace"))
    return names


def _der(data: bytes, start: int = 0) -> tuple[int, bytes, int]:
    """(tag, value, end) of the DER element at `start`."""
    tag, length, i = data[start], data[start + 1], start + 2
    if length & 0x80:
        count = length & 0x7F
        length, i = int.from_bytes(data[i:i + count], "big"), i + count
    if i + length > len(data):
        raise ValueError("truncated DER")
    return tag, data[i:i + length], i + length


def _children(data: bytes):
    """(tag, value) of each element of a DER sequence's contents."""
    i = 0
    while i < len(data):
        tag, value, i = _der(data, i)
        yield tag, value
