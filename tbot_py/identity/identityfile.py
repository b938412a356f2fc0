"""The tsh/tctl identity file: one text file holding a whole identity (tbot.md §5).

The format is Teleport's ``api/identityfile``: the private key PEM, the SSH
certificate line, the TLS certificate PEM, the SSH host CA lines and the TLS
CA PEMs, concatenated. Readers find the parts line by line, so rendering and
parsing here follow Teleport's encoder and decoder rule for rule; a file we
write must load in ``tsh -i`` and a file tsh writes must load here.

Rendering and parsing are pure; only :func:`read_identity_file` touches disk.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from tbot_py.errors import IdentityError
from tbot_py.identity.openssh import cert_authority_line

#: Every OpenSSH certificate key type ends with this (``sshutils.IsSSHCertType``).
_SSH_CERT_TYPE_SUFFIX = b"-cert-v01@openssh.com"
_CERT_AUTHORITY_MARKER = b"@cert-authority"
_PEM_BEGIN = b"-----BEGIN"
_PEM_END = b"-----END"


@dataclass(frozen=True)
class IdentityFile:
    """The parts of an identity file, each as the bytes the decoder collected.

    Missing parts are empty (``b""``); only the SSH certificate is required by
    the readers. PEM blocks and lines are whitespace-trimmed per line and
    newline-terminated, as Teleport's decoder returns them.
    """

    private_key_pem: bytes
    ssh_cert: bytes
    tls_cert_pem: bytes
    ssh_ca_lines: tuple[bytes, ...] = ()
    tls_ca_pems: tuple[bytes, ...] = ()


def _with_newline(part: bytes) -> bytes:
    return part if part.endswith(b"\n") else part + b"\n"


def render_identity_file(
    *,
    private_key_pem: bytes,
    ssh_cert: bytes,
    tls_cert_pem: bytes,
    ssh_ca_lines: Sequence[bytes],
    tls_ca_pems: Sequence[bytes],
) -> bytes:
    """Encode an identity file in Teleport's order, each part newline-terminated.

    ``ssh_ca_lines`` are known_hosts ``@cert-authority`` lines (see
    :func:`host_ca_line`); ``tls_ca_pems`` are PEM certificates.
    """
    parts: list[bytes] = [private_key_pem, ssh_cert, tls_cert_pem, *ssh_ca_lines, *tls_ca_pems]
    return b"".join(_with_newline(part) for part in parts)


def host_ca_line(cluster: str, ssh_public_key_line: bytes) -> bytes:
    """The identity file's known_hosts line trusting one host CA key of ``cluster``.

    ``@cert-authority <cluster>,*.<cluster> <keytype> <base64> type=host``: the
    trailing field is Teleport's url-encoded ``url.Values`` comment, which for
    tbot only ever holds ``type=host``. Any comment on the input key is dropped,
    as Go's ``ssh.MarshalAuthorizedKey`` does.
    """
    return cert_authority_line([cluster, f"*.{cluster}"], cluster, ssh_public_key_line)


def _is_ssh_cert_line(line: bytes) -> bool:
    # Teleport splits on a single space and tests the first token only.
    return line.split(b" ", 1)[0].endswith(_SSH_CERT_TYPE_SUFFIX)


def _decode(data: bytes) -> IdentityFile:
    """Split ``data`` into its parts without requiring any of them (Teleport's decoder)."""
    # Split on "\n" only and trim each line: this matches Go's bufio.ScanLines +
    # bytes.TrimSpace, which also drops the "\r" of CRLF files. bytes.splitlines
    # would also split on \v, \f and \x1c-\x1e, which Go does not.
    lines = [raw.strip() for raw in data.split(b"\n")]
    ssh_cert = b""
    ssh_cas: list[bytes] = []
    pem_blocks: list[bytes] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        i += 1
        if _is_ssh_cert_line(line):
            ssh_cert = line + b"\n"  # the last one wins
        elif line.startswith(_CERT_AUTHORITY_MARKER):
            ssh_cas.append(line + b"\n")
        elif line.startswith(_PEM_BEGIN):
            # The block swallows every line up to its END, whatever they hold.
            start = i - 1
            while not line.startswith(_PEM_END):
                if i == len(lines):
                    raise IdentityError("invalid PEM block (fragment)")
                line = lines[i]
                i += 1
            pem_blocks.append(b"\n".join(lines[start:i]) + b"\n")
    return IdentityFile(
        private_key_pem=pem_blocks[0] if pem_blocks else b"",
        ssh_cert=ssh_cert,
        tls_cert_pem=pem_blocks[1] if len(pem_blocks) > 1 else b"",
        ssh_ca_lines=tuple(ssh_cas),
        tls_ca_pems=tuple(pem_blocks[2:]),
    )


def parse_identity_file(data: bytes) -> IdentityFile:
    """Parse an identity file; raise IdentityError if it is malformed or has no SSH cert.

    Lines are trimmed. An SSH certificate line (first token ends in
    ``-cert-v01@openssh.com``) is the SSH cert, the last one winning;
    ``@cert-authority`` lines are SSH CAs; PEM blocks are, in order, the private
    key, the TLS cert and then TLS CAs. Everything else is ignored.
    """
    identity = _decode(data)
    if not identity.ssh_cert:
        raise IdentityError("could not find SSH cert in the identity file")
    return identity


def read_identity_file(path: str | os.PathLike[str]) -> IdentityFile:
    """Read and parse the identity file at ``path``.

    Like Teleport's ``ReadFile``, a file without an SSH cert is completed from
    ``<path>-cert.pub`` (read verbatim), the layout ``tsh`` uses for keys.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise IdentityError(f"cannot read identity file {path}: {exc.strerror}") from None
    identity = _decode(data)
    if identity.ssh_cert:
        return identity
    cert_path = Path(f"{path}-cert.pub")
    try:
        ssh_cert = cert_path.read_bytes()
    except OSError:
        raise IdentityError(
            f"could not find SSH cert in the identity file {path} or {cert_path}"
        ) from None
    if not ssh_cert:
        raise IdentityError(f"could not find SSH cert in the identity file {path} or {cert_path}")
    return replace(identity, ssh_cert=ssh_cert)
