"""OpenSSH artifacts of the identity output: known_hosts and ssh_config (tbot.md §4.2).

The text matches what tbot writes (Teleport's ``lib/config/openssh`` and
``GenerateKnownHosts``), so docs and scripts written for tbot work unchanged.
Where tbot would write a file that ssh misreads (a quote or newline in a path,
a ``%`` in a path), we escape what ssh_config can escape and refuse the rest
with a one-line error rather than write a config that points somewhere else.

Everything here is pure: strings in, bytes out.
"""

from __future__ import annotations

import base64
import binascii
import os
from collections.abc import Sequence

from tbot_py.errors import ConfigError, Error, IdentityError

#: Artifact names written next to the identity (tbot.md §4.2).
KNOWN_HOSTS = "known_hosts"
SSH_CONFIG = "ssh_config"

# The identity artifacts ssh reads (tbot.md §4.1).
_KEY = "key"
_SSH_CERT = "key-cert.pub"

#: Teleport's default SSH node port, used for every host but the proxy.
DEFAULT_NODE_PORT = 3022

# Characters that would change the meaning of a Host pattern or a known_hosts
# host list if they appeared inside a cluster or proxy name.
_PATTERN_SPECIALS = frozenset(",!*?#\"'\\")


def cluster_known_hosts_name(cluster: str) -> str:
    """Artifact name of the per-cluster known_hosts: ``<cluster>.known_hosts``."""
    return f"{cluster}.known_hosts"


def cluster_ssh_config_name(cluster: str) -> str:
    """Artifact name of the includable per-cluster ssh_config: ``<cluster>.ssh_config``."""
    return f"{cluster}.ssh_config"


def _check_host_name(kind: str, value: str, error: type[Error] = ConfigError) -> str:
    """Refuse names that ssh would read as several patterns, a negation or a wildcard."""
    if not value or any(
        c.isspace() or not c.isprintable() or c in _PATTERN_SPECIALS for c in value
    ):
        raise error(f"{kind} {value!r} cannot be used in known_hosts or ssh_config")
    return value


def _authorized_key(cluster: str, line: bytes) -> str:
    """``<keytype> <base64>`` of an authorized_keys line, dropping any comment.

    Go's ``ssh.MarshalAuthorizedKey`` writes no comment, and the field after the
    key must be the ``type=host`` comment that tsh parses. The blob must start
    with its own key type, which catches a truncated or mislabelled key early.
    """
    fields = line.split()
    try:
        key_type, blob = fields[0].decode("ascii"), base64.b64decode(fields[1], validate=True)
    except (IndexError, UnicodeDecodeError, binascii.Error):
        raise IdentityError(
            f"host CA key of cluster {cluster!r} is not an authorized_keys line"
        ) from None
    name_len = int.from_bytes(blob[:4], "big")
    if blob[4 : 4 + name_len] != key_type.encode():
        raise IdentityError(
            f"host CA key of cluster {cluster!r} does not match its type {key_type}"
        )
    return f"{key_type} {fields[1].decode('ascii')}"


def cert_authority_line(hosts: Sequence[str], cluster: str, host_ca_key: bytes) -> bytes:
    """One known_hosts line trusting a host CA key of ``cluster`` for ``hosts`` patterns.

    ``@cert-authority <h1>,<h2>,... <keytype> <base64> type=host``; the last field
    is Teleport's url-encoded ``url.Values`` comment, which for tbot only ever
    holds ``type=host``. ``cluster`` names the CA in errors and is checked too.
    """
    _check_host_name("cluster name", cluster, IdentityError)
    key = _authorized_key(cluster, host_ca_key)
    return f"@cert-authority {','.join(hosts)} {key} type=host\n".encode()


def render_known_hosts(proxy_host: str, clusters: Sequence[tuple[str, Sequence[bytes]]]) -> bytes:
    """The ``known_hosts`` artifact trusting each cluster's SSH host CA keys.

    ``clusters`` is ``(cluster name, host CA authorized_keys lines)`` pairs. One
    line per key: ``@cert-authority <proxy>,<cluster>,*.<cluster> <key> type=host``.
    """
    proxy = _check_host_name("proxy host", proxy_host)
    lines = [
        cert_authority_line([proxy, cluster, f"*.{cluster}"], cluster, key)
        for cluster, keys in clusters
        for key in keys
    ]
    return b"".join(lines)


def render_cluster_known_hosts(cluster: str, host_ca_keys: Sequence[bytes]) -> bytes:
    """The ``<cluster>.known_hosts`` artifact: the cluster's host CAs trusted for any host name.

    It pairs with :func:`render_cluster_ssh_config`, which has no Host match and
    so cannot rely on the host name to pick the cluster.
    """
    _check_host_name("cluster name", cluster, IdentityError)
    header = f"# Cluster specific known_hosts generated for cluster '{cluster}'\n".encode()
    return header + b"".join(cert_authority_line(["*"], cluster, key) for key in host_ca_keys)


def _config_path(path: str) -> str:
    """A path as a double-quoted ssh_config argument.

    ssh expands ``%`` tokens in IdentityFile, CertificateFile and
    UserKnownHostsFile, so a literal ``%`` is doubled. ssh_config has no portable
    escape for ``"`` or a newline (backslash escapes exist only in newer OpenSSH),
    and ``${`` starts an environment variable with no escape at all: refuse those.
    """
    bad = next((c for c in ('"', "\\", "\n", "\r", "\0") if c in path), None)
    if bad is not None or "${" in path:
        shown = repr(bad) if bad is not None else "'${'"
        raise ConfigError(
            f"destination path {path!r} contains {shown}, which ssh_config cannot express; "
            "choose a directory without it"
        )
    return '"' + path.replace("%", "%%") + '"'


def _proxy_command_quote(value: str) -> str:
    """Quote one ProxyCommand argument for the shell and for ssh's ``%`` expansion.

    Single quotes make the shell take the value literally (``'`` becomes
    ``'"'"'``); ``%`` is doubled because ssh expands tokens in ProxyCommand
    before the shell sees it. The line cannot hold a newline or NUL at all.
    Teleport turns a newline into the two characters ``\\n``, silently pointing
    at another path; we refuse instead.
    """
    if "\n" in value or "\r" in value or "\0" in value:
        raise ConfigError(f"ProxyCommand argument {value!r} contains a line break or NUL")
    return "'" + value.replace("'", "'\"'\"'").replace("%", "%%") + "'"


# (flag prefix, ssh token): the token must reach ssh un-doubled to be expanded.
_PLACEHOLDERS = (("--user=", "%r"), ("--host=", "%h"), ("--port=", "%p"))


def _proxy_command(
    *,
    executable: str,
    destination_dir: str,
    proxy_host: str,
    proxy_port: int,
    cluster: str,
    tls_routing: bool,
    connection_upgrade: bool,
) -> str:
    """The ``ssh-proxy-command`` invocation that tunnels one connection through the proxy.

    Every argument is single-quoted. The ``%r``, ``%h`` and ``%p`` placeholders
    are written *inside* the quotes but not escaped, so ssh substitutes the
    remote user, host and port and the shell then receives each as a single
    literal argument. tbot leaves them bare (``--host=%h``); quoting them too
    keeps shell metacharacters in a host or user name (``ssh 'a;b.cluster'`` on
    OpenSSH before the CVE-2023-51385 fix) from running as commands. Only a
    ``'`` in the name can still end the quote; fixed OpenSSH refuses such names.
    """
    host = f"[{proxy_host}]" if ":" in proxy_host else proxy_host
    literal = [
        executable,
        "ssh-proxy-command",
        f"--destination-dir={destination_dir}",
        f"--proxy-server={host}:{proxy_port}",
        f"--cluster={cluster}",
        "--tls-routing" if tls_routing else "--no-tls-routing",
        "--connection-upgrade" if connection_upgrade else "--no-connection-upgrade",
        # tbot always enables resumption for its ssh_config (tbot.md §4.2).
        "--resume",
    ]
    args = [_proxy_command_quote(arg) for arg in literal]
    args += [f"{_proxy_command_quote(flag)[:-1]}{token}'" for flag, token in _PLACEHOLDERS]
    return " ".join(args)


def _check_port(kind: str, port: int) -> int:
    if not 0 < port < 65536:
        raise ConfigError(f"{kind} {port} is not a TCP port")
    return port


def _credential_options(dest: str, known_hosts_name: str, indent: str) -> str:
    """The three options that point ssh at the files of the identity output."""
    return (
        f"{indent}UserKnownHostsFile {_config_path(os.path.join(dest, known_hosts_name))}\n"
        f"{indent}IdentityFile {_config_path(os.path.join(dest, _KEY))}\n"
        f"{indent}CertificateFile {_config_path(os.path.join(dest, _SSH_CERT))}\n"
    )


def render_ssh_config(
    *,
    proxy_host: str,
    proxy_port: int,
    cluster_names: Sequence[str],
    destination_dir: str | os.PathLike[str],
    executable: str,
    tls_routing: bool,
    connection_upgrade: bool,
    node_port: int = DEFAULT_NODE_PORT,
) -> bytes:
    """The ``ssh_config`` artifact: reach every node of each cluster through the proxy.

    Per cluster, one ``Host *.<cluster> <proxy>`` block points ssh at the
    credentials in ``destination_dir`` (made absolute), and one
    ``Host *.<cluster> !<proxy>`` block sets the node port and a ProxyCommand
    running ``executable ssh-proxy-command``. ``executable`` is the path of our
    own ``tbot-py`` program, chosen by the caller.
    """
    proxy = _check_host_name("proxy host", proxy_host)
    _check_port("proxy port", proxy_port)
    _check_port("node port", node_port)
    dest = os.path.abspath(destination_dir)
    credentials = _credential_options(dest, KNOWN_HOSTS, indent="    ")
    out = [f"# Begin generated Teleport configuration for {proxy} by tbot\n"]
    for cluster in cluster_names:
        _check_host_name("cluster name", cluster, IdentityError)
        command = _proxy_command(
            executable=executable,
            destination_dir=dest,
            proxy_host=proxy,
            proxy_port=proxy_port,
            cluster=cluster,
            tls_routing=tls_routing,
            connection_upgrade=connection_upgrade,
        )
        out.append(
            f"\n# Common flags for all {cluster} hosts\n"
            f"Host *.{cluster} {proxy}\n"
            f"{credentials}"
            f"\n# Flags for all {cluster} hosts except the proxy\n"
            f"Host *.{cluster} !{proxy}\n"
            f"    Port {node_port}\n"
            f"    ProxyCommand {command}"
        )
    # Like tbot's template: no blank line between clusters, one before the footer.
    out.append("\n\n# End generated Teleport configuration\n")
    return "".join(out).encode()


def render_cluster_ssh_config(
    *,
    proxy_host: str,
    proxy_port: int,
    cluster_name: str,
    destination_dir: str | os.PathLike[str],
    executable: str,
    tls_routing: bool,
    connection_upgrade: bool,
    node_port: int = DEFAULT_NODE_PORT,
) -> bytes:
    """The includable ``<cluster>.ssh_config``: the same options with no Host match.

    Meant for ``Include`` inside the user's own ``Host`` block, so it trusts the
    cluster's host CAs for any name via ``<cluster>.known_hosts``.
    """
    proxy = _check_host_name("proxy host", proxy_host)
    cluster = _check_host_name("cluster name", cluster_name, IdentityError)
    _check_port("proxy port", proxy_port)
    _check_port("node port", node_port)
    dest = os.path.abspath(destination_dir)
    command = _proxy_command(
        executable=executable,
        destination_dir=dest,
        proxy_host=proxy,
        proxy_port=proxy_port,
        cluster=cluster,
        tls_routing=tls_routing,
        connection_upgrade=connection_upgrade,
    )
    return (
        f"# Cluster-specific ssh_config generated by tbot for cluster '{cluster}'"
        f" via proxy '{proxy}:{proxy_port}'\n"
        f"{_credential_options(dest, cluster_known_hosts_name(cluster), indent='')}"
        f"Port {node_port}\n"
        f"ProxyCommand {command}\n"
    ).encode()
