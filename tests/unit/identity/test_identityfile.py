from __future__ import annotations

from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import ssh

from tbot_py.errors import IdentityError
from tbot_py.identity import keys
from tbot_py.identity.identityfile import (
    IdentityFile,
    host_ca_line,
    parse_identity_file,
    read_identity_file,
    render_identity_file,
)

from .conftest import Material


def _render(m: Material, *, ssh_cert: bytes | None = None) -> bytes:
    return render_identity_file(
        private_key_pem=m.private_key_pem,
        ssh_cert=m.ssh_cert if ssh_cert is None else ssh_cert,
        tls_cert_pem=m.tls_cert_pem,
        ssh_ca_lines=[host_ca_line("example.com", m.host_ca_key_line)],
        tls_ca_pems=[m.tls_ca_pem],
    )


def test_render_concatenates_parts_in_teleport_order(material: Material) -> None:
    ca_line = host_ca_line("example.com", material.host_ca_key_line)
    data = _render(material)
    assert data == (
        material.private_key_pem
        + material.ssh_cert
        + material.tls_cert_pem
        + ca_line
        + material.tls_ca_pem
    )


def test_render_adds_newline_only_where_missing(material: Material) -> None:
    data = render_identity_file(
        private_key_pem=b"KEY",
        ssh_cert=b"CERT\n",
        tls_cert_pem=b"TLS",
        ssh_ca_lines=[b"CA1", b"CA2\n"],
        tls_ca_pems=[],
    )
    assert data == b"KEY\nCERT\nTLS\nCA1\nCA2\n"


def test_host_ca_line_format_drops_key_comment(material: Material) -> None:
    key_type, blob = material.host_ca_key_line.split()[:2]
    line = host_ca_line("example.com", material.host_ca_key_line.rstrip() + b" some comment\n")
    assert line == b"@cert-authority example.com,*.example.com %s %s type=host\n" % (key_type, blob)


def test_host_ca_line_rejects_bad_input(material: Material) -> None:
    with pytest.raises(IdentityError):
        host_ca_line("a b", material.host_ca_key_line)
    with pytest.raises(IdentityError):
        host_ca_line("example.com", b"just-one-field")


def test_round_trip_parts_load_with_cryptography(material: Material) -> None:
    parsed = parse_identity_file(_render(material))

    assert parsed == IdentityFile(
        private_key_pem=material.private_key_pem,
        ssh_cert=material.ssh_cert,
        tls_cert_pem=material.tls_cert_pem,
        ssh_ca_lines=(host_ca_line("example.com", material.host_ca_key_line),),
        tls_ca_pems=(material.tls_ca_pem,),
    )
    key = serialization.load_pem_private_key(parsed.private_key_pem, password=None)
    cert = x509.load_pem_x509_certificate(parsed.tls_cert_pem)
    assert keys.same_public_key(cert.public_key(), key.public_key())  # type: ignore[arg-type]
    ssh_cert = ssh.load_ssh_public_identity(parsed.ssh_cert)
    assert isinstance(ssh_cert, ssh.SSHCertificate)
    assert ssh_cert.valid_principals == [b"root", b"-teleport-internal-join"]
    ssh_cert.verify_cert_signature()
    x509.load_pem_x509_certificate(parsed.tls_ca_pems[0])
    # The CA line's key field loads as the host CA key.
    ca_fields = parsed.ssh_ca_lines[0].split()
    assert ca_fields[0] == b"@cert-authority"
    assert keys.same_public_key(
        keys.load_ssh_public_key_line(b" ".join(ca_fields[2:4])),
        keys.load_ssh_public_key_line(material.host_ca_key_line),
    )


def test_several_ca_pems_after_the_tls_cert_are_all_cas(
    material: Material, other_material: Material
) -> None:
    data = render_identity_file(
        private_key_pem=material.private_key_pem,
        ssh_cert=material.ssh_cert,
        tls_cert_pem=material.tls_cert_pem,
        ssh_ca_lines=[],
        tls_ca_pems=[material.tls_ca_pem, other_material.tls_ca_pem],
    )
    parsed = parse_identity_file(data)
    assert parsed.tls_ca_pems == (material.tls_ca_pem, other_material.tls_ca_pem)
    assert parsed.ssh_ca_lines == ()


def test_parser_ignores_junk_lines_and_trims_whitespace(material: Material) -> None:
    indented_key = b"\n".join(
        b"   " + line + b"\t" for line in material.private_key_pem.split(b"\n")
    )
    data = (
        b"# a comment\n"
        + b"garbage that means nothing\n\n"
        + indented_key
        + b"\n"
        + b"ssh-ed25519 AAAAnot-a-cert ignored\n"
        + b"  "
        + material.ssh_cert
        + b"more junk\n"
        + material.tls_cert_pem
    )
    parsed = parse_identity_file(data)
    assert parsed.private_key_pem == material.private_key_pem
    assert parsed.ssh_cert == material.ssh_cert
    assert parsed.tls_cert_pem == material.tls_cert_pem
    assert parsed.tls_ca_pems == ()


def test_parser_accepts_crlf_line_endings(material: Material) -> None:
    parsed = parse_identity_file(_render(material).replace(b"\n", b"\r\n"))
    assert parsed.private_key_pem == material.private_key_pem
    assert parsed.ssh_cert == material.ssh_cert
    assert parsed.tls_ca_pems == (material.tls_ca_pem,)
    serialization.load_pem_private_key(parsed.private_key_pem, password=None)


def test_parser_last_ssh_cert_wins(material: Material, other_material: Material) -> None:
    data = _render(material) + other_material.ssh_cert
    assert parse_identity_file(data).ssh_cert == other_material.ssh_cert


def test_parser_keeps_a_cert_looking_line_inside_a_pem_block(material: Material) -> None:
    # Teleport's decoder consumes every line up to END once a block has begun.
    lines = material.tls_cert_pem.split(b"\n")
    odd_block = b"\n".join([lines[0], material.ssh_cert.strip(), *lines[1:]])
    data = material.private_key_pem + odd_block + material.ssh_cert
    parsed = parse_identity_file(data)
    assert parsed.tls_cert_pem == odd_block


def test_parser_rejects_unterminated_pem_block(material: Material) -> None:
    data = material.ssh_cert + material.private_key_pem.split(b"-----END")[0]
    with pytest.raises(IdentityError, match=r"^invalid PEM block \(fragment\)$"):
        parse_identity_file(data)


def test_parser_requires_ssh_cert(material: Material) -> None:
    data = material.private_key_pem + material.tls_cert_pem
    with pytest.raises(IdentityError, match=r"^could not find SSH cert in the identity file$"):
        parse_identity_file(data)
    with pytest.raises(IdentityError, match="could not find SSH cert"):
        parse_identity_file(b"")


def test_read_identity_file_reads_from_disk(tmp_path: Path, material: Material) -> None:
    path = tmp_path / "identity"
    path.write_bytes(_render(material))
    assert read_identity_file(path).ssh_cert == material.ssh_cert


def test_read_identity_file_falls_back_to_cert_pub(tmp_path: Path, material: Material) -> None:
    path = tmp_path / "identity"
    path.write_bytes(material.private_key_pem + material.tls_cert_pem)
    (tmp_path / "identity-cert.pub").write_bytes(material.ssh_cert)
    parsed = read_identity_file(str(path))
    assert parsed.ssh_cert == material.ssh_cert
    assert parsed.private_key_pem == material.private_key_pem
    assert parsed.tls_cert_pem == material.tls_cert_pem


def test_read_identity_file_without_any_cert_names_both_paths(
    tmp_path: Path, material: Material
) -> None:
    path = tmp_path / "identity"
    path.write_bytes(material.private_key_pem)
    with pytest.raises(IdentityError, match="could not find SSH cert") as info:
        read_identity_file(path)
    assert f"{path}-cert.pub" in str(info.value)


def test_read_identity_file_missing_file_is_one_line_error(tmp_path: Path) -> None:
    with pytest.raises(IdentityError, match="cannot read identity file"):
        read_identity_file(tmp_path / "nope")
