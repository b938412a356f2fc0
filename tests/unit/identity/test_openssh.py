from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tbot_py.errors import ConfigError, IdentityError
from tbot_py.identity import keys
from tbot_py.identity.openssh import (
    cluster_known_hosts_name,
    cluster_ssh_config_name,
    render_cluster_known_hosts,
    render_cluster_ssh_config,
    render_known_hosts,
    render_ssh_config,
)

from .conftest import Material

SSH = shutil.which("ssh") or "/usr/bin/ssh"
SSH_KEYGEN = shutil.which("ssh-keygen") or "/usr/bin/ssh-keygen"
needs_ssh = pytest.mark.skipif(not os.path.exists(SSH), reason="OpenSSH client not installed")


def _key_text(line: bytes) -> str:
    return b" ".join(line.split()[:2]).decode()


def _ssh_g(config: Path, host: str, *extra: str) -> dict[str, str]:
    """Run ``ssh -G`` and return its resolved options (first value of each key)."""
    result = subprocess.run(
        [SSH, "-G", "-F", str(config), *extra, host],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    options: dict[str, str] = {}
    for line in result.stdout.splitlines():
        key, _, value = line.partition(" ")
        options.setdefault(key, value)
    return options


def _render(dest: Path, executable: str = "/usr/local/bin/tbot-py", **kw: object) -> bytes:
    params: dict[str, object] = {
        "proxy_host": "proxy.example.com",
        "proxy_port": 443,
        "cluster_names": ["example.com"],
        "destination_dir": dest,
        "executable": executable,
        "tls_routing": True,
        "connection_upgrade": False,
    }
    params.update(kw)
    return render_ssh_config(**params)  # type: ignore[arg-type]


# -- known_hosts ---------------------------------------------------------------


def test_known_hosts_has_one_line_per_cluster_key(
    material: Material, other_material: Material
) -> None:
    data = render_known_hosts(
        "proxy.example.com",
        [
            ("root", [material.host_ca_key_line, other_material.host_ca_key_line]),
            ("leaf", [other_material.host_ca_key_line.rstrip() + b" a comment\n"]),
        ],
    )
    key1, key2 = _key_text(material.host_ca_key_line), _key_text(other_material.host_ca_key_line)
    assert data.decode() == (
        f"@cert-authority proxy.example.com,root,*.root {key1} type=host\n"
        f"@cert-authority proxy.example.com,root,*.root {key2} type=host\n"
        f"@cert-authority proxy.example.com,leaf,*.leaf {key2} type=host\n"
    )


def test_known_hosts_is_understood_by_ssh_keygen(tmp_path: Path, material: Material) -> None:
    path = tmp_path / "known_hosts"
    path.write_bytes(render_known_hosts("proxy.example.com", [("c1", [material.host_ca_key_line])]))

    def found(host: str) -> bool:
        result = subprocess.run(
            [SSH_KEYGEN, "-F", host, "-f", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        return result.returncode == 0 and "CA" in result.stdout

    assert found("node1.c1")
    assert found("proxy.example.com")
    assert not found("node1.other")


def test_cluster_known_hosts_trusts_any_host(tmp_path: Path, material: Material) -> None:
    data = render_cluster_known_hosts("c1", [material.host_ca_key_line])
    assert data.decode() == (
        "# Cluster specific known_hosts generated for cluster 'c1'\n"
        f"@cert-authority * {_key_text(material.host_ca_key_line)} type=host\n"
    )
    path = tmp_path / cluster_known_hosts_name("c1")
    path.write_bytes(data)
    result = subprocess.run(
        [SSH_KEYGEN, "-F", "anything.example.org", "-f", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 0


def test_known_hosts_rejects_bad_keys_and_names(material: Material) -> None:
    with pytest.raises(IdentityError, match="not an authorized_keys line"):
        render_known_hosts("proxy", [("c1", [b"ecdsa-sha2-nistp256 !!!notbase64"])])
    with pytest.raises(IdentityError, match="does not match its type"):
        render_known_hosts(
            "proxy", [("c1", [b"ssh-ed25519 " + material.host_ca_key_line.split()[1]])]
        )
    with pytest.raises(IdentityError, match="cluster name"):
        render_cluster_known_hosts("c1,evil", [material.host_ca_key_line])
    with pytest.raises(ConfigError, match="proxy host"):
        render_known_hosts("proxy *", [("c1", [material.host_ca_key_line])])


# -- ssh_config ----------------------------------------------------------------


def test_ssh_config_matches_tbot_layout() -> None:
    data = render_ssh_config(
        proxy_host="proxy.example.com",
        proxy_port=443,
        cluster_names=["root", "leaf"],
        destination_dir="/opt/machine-id",
        executable="/usr/local/bin/tbot-py",
        tls_routing=True,
        connection_upgrade=False,
    )

    def command(cluster: str) -> str:
        return (
            "'/usr/local/bin/tbot-py' 'ssh-proxy-command' '--destination-dir=/opt/machine-id'"
            f" '--proxy-server=proxy.example.com:443' '--cluster={cluster}' '--tls-routing'"
            " '--no-connection-upgrade' '--resume' '--user=%r' '--host=%h' '--port=%p'"
        )

    def block(cluster: str) -> str:
        return (
            f"\n# Common flags for all {cluster} hosts\n"
            f"Host *.{cluster} proxy.example.com\n"
            '    UserKnownHostsFile "/opt/machine-id/known_hosts"\n'
            '    IdentityFile "/opt/machine-id/key"\n'
            '    CertificateFile "/opt/machine-id/key-cert.pub"\n'
            f"\n# Flags for all {cluster} hosts except the proxy\n"
            f"Host *.{cluster} !proxy.example.com\n"
            "    Port 3022\n"
            f"    ProxyCommand {command(cluster)}"
        )

    assert data.decode() == (
        "# Begin generated Teleport configuration for proxy.example.com by tbot\n"
        + block("root")
        + block("leaf")
        + "\n\n# End generated Teleport configuration\n"
    )


@needs_ssh
def test_ssh_resolves_node_options_from_ssh_config(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    config = tmp_path / "ssh_config"
    config.write_bytes(_render(dest, cluster_names=["example.com", "leaf"]))

    for host in ("node1.example.com", "node1.leaf"):
        options = _ssh_g(config, host)
        assert options["identityfile"] == f"{dest}/key"
        assert options["certificatefile"] == f"{dest}/key-cert.pub"
        assert options["userknownhostsfile"] == f"{dest}/known_hosts"
        assert options["port"] == "3022"
        assert "ssh-proxy-command" in options["proxycommand"]

    proxy = _ssh_g(config, "proxy.example.com")
    assert proxy["identityfile"] == f"{dest}/key"
    assert proxy["port"] == "22"
    assert proxy.get("proxycommand", "none") == "none"

    unrelated = _ssh_g(config, "node1.elsewhere.org")
    assert unrelated["port"] == "22"
    assert unrelated["userknownhostsfile"] != f"{dest}/known_hosts"


@needs_ssh
def test_cluster_ssh_config_is_includable_and_resolves(tmp_path: Path) -> None:
    dest = tmp_path / "out"
    data = render_cluster_ssh_config(
        proxy_host="proxy.example.com",
        proxy_port=3080,
        cluster_name="example.com",
        destination_dir=dest,
        executable="/usr/local/bin/tbot-py",
        tls_routing=False,
        connection_upgrade=True,
    )
    assert b"Host " not in data
    assert data.startswith(
        b"# Cluster-specific ssh_config generated by tbot for cluster 'example.com'"
        b" via proxy 'proxy.example.com:3080'\n"
    )
    included = tmp_path / cluster_ssh_config_name("example.com")
    included.write_bytes(data)
    config = tmp_path / "ssh_config"
    config.write_text(f'Host my-node\n    Include "{included}"\n')

    options = _ssh_g(config, "my-node")
    assert options["userknownhostsfile"] == f"{dest}/example.com.known_hosts"
    assert options["identityfile"] == f"{dest}/key"
    assert options["certificatefile"] == f"{dest}/key-cert.pub"
    assert options["port"] == "3022"
    assert "'--no-tls-routing' '--connection-upgrade'" in options["proxycommand"]


def _record_proxy_command(tmp_path: Path, config: Path, host: str, user: str) -> list[str]:
    """Run real ssh; its ProxyCommand records argv and exits, so the connection fails."""
    argv_out = tmp_path / "argv.txt"
    result = subprocess.run(
        [SSH, "-F", str(config), "-o", "BatchMode=yes", "-l", user, host, "true"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={**os.environ, "ARGV_OUT": str(argv_out)},
    )
    assert argv_out.exists(), result.stderr
    return argv_out.read_text().split("\0")[:-1]


def _recorder(directory: Path) -> Path:
    directory.mkdir(parents=True)
    script = directory / "tbot-py"
    script.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\0" "$a"; done > "$ARGV_OUT"\n')
    script.chmod(0o755)
    return script


@needs_ssh
def test_proxy_command_reaches_tbot_with_exact_arguments(tmp_path: Path) -> None:
    # Paths full of shell and ssh specials: space, quote, percent, $(...), backtick.
    nasty = tmp_path / "we ird'dir %d $(touch pwned) `id`"
    executable = _recorder(nasty / "bin")
    dest = nasty / "out"
    config = tmp_path / "ssh_config"
    config.write_bytes(_render(dest, executable=str(executable)))

    argv = _record_proxy_command(tmp_path, config, "node1.example.com", "alice")

    assert argv == [
        "ssh-proxy-command",
        f"--destination-dir={dest}",
        "--proxy-server=proxy.example.com:443",
        "--cluster=example.com",
        "--tls-routing",
        "--no-connection-upgrade",
        "--resume",
        "--user=alice",
        "--host=node1.example.com",
        "--port=3022",
    ]
    assert not list(tmp_path.rglob("pwned"))
    assert not (Path.cwd() / "pwned").exists()
    # ssh un-doubles the %% of the credential paths too.
    options = _ssh_g(config, "node1.example.com")
    assert options["userknownhostsfile"] == f"{dest}/known_hosts"


@needs_ssh
def test_placeholders_expand_to_single_arguments(tmp_path: Path) -> None:
    executable = _recorder(tmp_path / "bin")
    config = tmp_path / "ssh_config"
    config.write_bytes(_render(tmp_path / "out", executable=str(executable)))

    argv = _record_proxy_command(tmp_path, config, "node1.example.com", "user with space")

    assert "--user=user with space" in argv


def test_ssh_config_brackets_ipv6_proxy_server(tmp_path: Path) -> None:
    data = _render(tmp_path, proxy_host="::1")
    assert b"'--proxy-server=[::1]:443'" in data
    assert b"Host *.example.com !::1\n" in data


def test_ssh_config_makes_destination_absolute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    data = _render(Path("rel"))
    assert f'IdentityFile "{tmp_path}/rel/key"'.encode() in data
    assert f"'--destination-dir={tmp_path}/rel'".encode() in data


@pytest.mark.parametrize("bad", ['/tmp/a"b', "/tmp/a\\b", "/tmp/a\nb", "/tmp/${HOME}"])
def test_ssh_config_refuses_paths_ssh_cannot_express(bad: str) -> None:
    with pytest.raises(ConfigError, match="ssh_config cannot express"):
        _render(Path("/"), destination_dir=bad)


def test_ssh_config_refuses_newline_in_executable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="line break"):
        _render(tmp_path, executable="/usr/bin/tbot\n-py")


@pytest.mark.parametrize("cluster", ["", "a b", "a,b", "!a", "a*", "a#b"])
def test_ssh_config_refuses_cluster_names_that_are_not_one_pattern(
    tmp_path: Path, cluster: str
) -> None:
    with pytest.raises(IdentityError, match="cluster name"):
        _render(tmp_path, cluster_names=[cluster])


def test_ssh_config_refuses_bad_ports(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a TCP port"):
        _render(tmp_path, proxy_port=0)
    with pytest.raises(ConfigError, match="not a TCP port"):
        _render(tmp_path, node_port=70000)


def test_rendered_host_ca_lines_use_generated_keys(material: Material) -> None:
    # The key field survives unchanged, so ssh trusts exactly the CA's key.
    data = render_known_hosts("p", [("c", [material.host_ca_key_line])])
    field = b" ".join(data.split()[2:4])
    assert keys.same_public_key(
        keys.load_ssh_public_key_line(field),
        keys.load_ssh_public_key_line(material.host_ca_key_line),
    )
