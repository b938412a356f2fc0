"""Is a destination's set whole and matching? Checks after a crash, and readers during renewals.

A directory destination publishes each set of artifacts with one rename of ``..data``
(``tbot_py/destinations/layout.py``). This module judges that from the outside, with
``cryptography`` and ``openssl``, never with the layout code under test:

- after a ``kill -9`` (nothing writes any more), :func:`check_set` resolves ``..data`` once
  and proves the key and certificates of that version belong together and verify, and that
  the flat names lead to the same bytes; :func:`interrupted_write` says whether the kill
  fell inside a write (an unpublished version, a temporary link, a half-pruned old one);
- while the daemon renews, reader *processes* read key and certificate the way the README
  tells readers to (``versioned``: resolve ``..data`` once; ``identity-file``: one file) and
  the naive way (``flat-names``: open ``key``, then ``tlscert``), counting mismatched pairs;
  :func:`run_readers` drives the renewals with SIGUSR1 and collects the counts.

It imports only the standard library, ``cryptography`` and ``tbot_py``, so it also runs as a
script: that is how the reader processes start, and how ``bench/reader_consistency.py``
runs the same scenario without importing the ``tests`` package::

    python tests/integration/_consistency.py read KIND DIR     one reader, until SIGTERM
    python tests/integration/_consistency.py drive --pid PID --dir DIR --renewals N
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from tbot_py.errors import IdentityError
from tbot_py.identity.identityfile import parse_identity_file

DATA = "..data"
TEMP_PREFIX = "..tmp-"
#: A version directory's name, as the README shows it: when it was made, and a random suffix.
VERSION_NAME = re.compile(r"^\.\.\d{4}_\d\d_\d\d_\d\d_\d\d_\d\d\.\d{9}-[0-9a-f]{6}$")
#: The reader kinds: the two the README documents, then the naive one it warns about.
READER_KINDS = ("versioned", "identity-file", "flat-names")
USER_CA = "teleport-user-ca.crt"
BOT_CAS = "tlscacerts"


# -- keys and certificates -----------------------------------------------------------------


def _spki(public_key: PublicKeyTypes) -> bytes:
    return public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def key_spki(pem: bytes) -> bytes:
    """The public half (DER SPKI) of a PEM private key; ValueError if it is not one."""
    return _spki(serialization.load_pem_private_key(pem, password=None).public_key())


def cert_spki(pem: bytes) -> bytes:
    """The key (DER SPKI) a PEM certificate certifies; ValueError if it is not one."""
    return _spki(x509.load_pem_x509_certificate(pem).public_key())


def ssh_spki(line: bytes) -> bytes:
    """The key (DER SPKI) of an OpenSSH public key or certificate line, comment ignored."""
    loaded = serialization.load_ssh_public_identity(b" ".join(line.strip().split(b" ")[:2]))
    if isinstance(loaded, serialization.SSHCertificate):
        return _spki(loaded.public_key())
    return _spki(loaded)


def pair_matches(key_pem: bytes, cert_pem: bytes) -> bool:
    """Whether a private key and a certificate belong together (torn bytes never do)."""
    try:
        return key_spki(key_pem) == cert_spki(cert_pem)
    except ValueError:
        return False


def _issued_by(cert: x509.Certificate, ca: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(ca)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def openssl_verifies(ca_file: Path, cert_file: Path) -> str | None:
    """None if ``openssl verify -CAfile`` accepts the certificate, else what it said."""
    done = subprocess.run(
        ["openssl", "verify", "-CAfile", str(ca_file), str(cert_file)],
        capture_output=True, text=True, check=False, timeout=30,
    )  # fmt: skip
    return None if done.returncode == 0 else (done.stdout + done.stderr).strip()


# -- a set at rest -------------------------------------------------------------------------


def _set_problems(files: dict[str, bytes], version: Path, ca_name: str, openssl: bool) -> list[str]:
    """What is wrong with one version's files: every part must belong to ``key`` and verify."""
    try:
        key = key_spki(files["key"])
        parts = {
            "tlscert": cert_spki(files["tlscert"]),
            "key-cert.pub": ssh_spki(files["key-cert.pub"]),
            "key.pub": ssh_spki(files["key.pub"]),
        }
        problems = []
        if "identity" in files:
            parsed = parse_identity_file(files["identity"])
            parts["the identity file's key"] = key_spki(parsed.private_key_pem)
            if parsed.tls_cert_pem.strip() != files["tlscert"].strip():
                problems.append("the identity file holds another TLS certificate than tlscert")
            if parsed.ssh_cert.strip() != files["key-cert.pub"].strip():
                problems.append("the identity file holds another SSH certificate than key-cert.pub")
        problems += [f"{name} does not match key" for name, spki in parts.items() if spki != key]
        cert = x509.load_pem_x509_certificate(files["tlscert"])
        if not any(_issued_by(cert, ca) for ca in x509.load_pem_x509_certificates(files[ca_name])):
            problems.append(f"tlscert is not issued by a CA in {ca_name}")
        if cert.not_valid_after_utc <= datetime.now(UTC):
            problems.append(f"tlscert expired at {cert.not_valid_after_utc}")
    except (KeyError, ValueError, IdentityError) as exc:
        return [f"unreadable set: {exc!r}"]
    if openssl and (said := openssl_verifies(version / ca_name, version / "tlscert")):
        problems.append(f"openssl verify: {said}")
    return problems


def check_set(
    directory: Path, names: frozenset[str], *, ca_name: str = USER_CA, openssl: bool = False
) -> list[str]:
    """What is wrong with the set ``..data`` names and with the flat names; [] if it is whole.

    Only valid while nothing writes: the flat names are compared with that same version.
    """
    try:
        os.readlink(directory / DATA)
    except OSError as exc:
        return [f"{directory}/{DATA}: {exc.strerror}"]
    version = Path(os.path.realpath(directory / DATA))  # resolved once, as readers are told
    where = f"{directory.name}/{version.name}"
    if version.parent != Path(os.path.realpath(directory)):
        return [f"{directory}/{DATA} leads out of the directory, to {version}"]
    try:
        files = {p.name: p.read_bytes() for p in version.iterdir() if p.is_file()}
    except OSError as exc:
        return [f"{directory}/{DATA} names {version.name}, which cannot be read: {exc}"]
    problems = []
    if set(files) != names:
        problems.append(f"{where} holds {sorted(files)}, expected {sorted(names)}")
    problems += [f"{where}: {p}" for p in _set_problems(files, version, ca_name, openssl)]
    for name in sorted(names):
        flat = directory / name
        try:
            link, data = os.readlink(flat), flat.read_bytes()
        except OSError as exc:
            problems.append(f"{directory.name}/{name}: {exc.strerror}")
            continue
        if link != f"{DATA}/{name}":
            problems.append(f"{directory.name}/{name} links to {link}, not {DATA}/{name}")
        elif data != files.get(name):
            problems.append(f"{directory.name}/{name} differs from {where}/{name}")
    return problems


def interrupted_write(directory: Path) -> list[str]:
    """Traces of a write cut short: a temporary link, an unpublished or an unpruned version.

    Each trace reads ``<kind> <name>``, the kind being its first two words.
    """
    entries = os.listdir(directory)
    try:
        current: str | None = os.readlink(directory / DATA)
    except FileNotFoundError:
        current = None
    temps = sorted(e for e in entries if e.startswith(TEMP_PREFIX))
    versions = sorted(e for e in entries if VERSION_NAME.match(e))
    # Version names start with the time they were made: newer than ..data means unpublished.
    unpublished = [v for v in versions if current is None or v > current]
    older = [v for v in versions if current is not None and v < current]
    traces = [f"temporary link {t}" for t in temps]
    traces += [f"unpublished version {v}" for v in unpublished]
    # A write keeps one previous version; more means its prune was cut short.
    traces += [f"unpruned version {v}" for v in older[:-1]]
    return traces


# -- readers during renewals -----------------------------------------------------------------


def read_pair(kind: str, directory: Path) -> tuple[bytes, bytes]:
    """(private key PEM, TLS certificate PEM), read the way a ``kind`` reader reads them."""
    if kind == "versioned":
        version = Path(os.path.realpath(directory / DATA))  # once; both files from it
        return (version / "key").read_bytes(), (version / "tlscert").read_bytes()
    if kind == "identity-file":
        parsed = parse_identity_file((directory / "identity").read_bytes())
        return parsed.private_key_pem, parsed.tls_cert_pem
    if kind == "flat-names":
        return (directory / "key").read_bytes(), (directory / "tlscert").read_bytes()
    raise ValueError(f"unknown reader kind {kind!r}; one of {', '.join(READER_KINDS)}")


@dataclass
class ReaderCount:
    """What one reader process saw."""

    kind: str
    reads: int = 0
    mismatches: int = 0
    #: Reads that found a file gone (a version pruned under a slow reader) and were retried.
    vanished: int = 0
    #: Distinct certificates read: proof the reader saw the renewals, not one old set.
    certificates: int = 0

    @property
    def rate(self) -> float:
        return self.mismatches / self.reads if self.reads else 0.0


def reader_loop(kind: str, directory: Path, pause: float) -> ReaderCount:
    """Read pairs, ``pause`` s apart, until SIGTERM; say ``ready`` once SIGTERM is handled."""
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    count = ReaderCount(kind)
    seen: set[bytes] = set()
    while not stopping:
        try:
            key, cert = read_pair(kind, directory)
        except FileNotFoundError:
            count.vanished += 1
            continue
        except IdentityError:  # an identity file that does not parse is a torn one
            key, cert = b"", b""
        count.reads += 1
        if not pair_matches(key, cert):
            count.mismatches += 1
        seen.add(cert)
        time.sleep(pause)
    count.certificates = len(seen)
    return count


@dataclass
class ReaderRun:
    """One run of :func:`run_readers`."""

    renewals: int  # distinct versions published while the readers ran
    seconds: float
    readers: dict[str, ReaderCount]


def run_readers(
    pid: int,
    directory: Path,
    renewals: int,
    *,
    timeout: float,
    every: float = 0.02,
    pause: float = 0.001,
) -> ReaderRun:
    """Start one reader process per kind, SIGUSR1 ``pid`` every ``every`` s until ``..data``
    moved ``renewals`` times, then stop the readers and collect their counts.

    The daemon must already handle SIGUSR1 (its default action would kill it).
    """
    me = str(Path(__file__).resolve())
    readers = {
        kind: subprocess.Popen(
            [sys.executable, me, "read", kind, str(directory), "--pause", str(pause)],
            stdout=subprocess.PIPE,
            text=True,
        )
        for kind in READER_KINDS
    }
    try:
        for kind, reader in readers.items():
            assert reader.stdout is not None
            line = reader.stdout.readline()
            assert line == "ready\n", f"{kind} reader did not start: {line!r}"
        started = time.monotonic()
        seen = {os.readlink(directory / DATA)}
        next_signal = started
        while len(seen) <= renewals:
            now = time.monotonic()
            if now - started > timeout:
                raise AssertionError(f"only {len(seen) - 1} renewals in {timeout:g} s")
            if now >= next_signal:
                os.kill(pid, signal.SIGUSR1)
                next_signal = now + every
            seen.add(os.readlink(directory / DATA))
            time.sleep(0.001)
        seconds = time.monotonic() - started
        counts = {}
        for kind, reader in readers.items():
            reader.send_signal(signal.SIGTERM)
            out, _ = reader.communicate(timeout=30)
            assert reader.returncode == 0, f"{kind} reader exited {reader.returncode}"
            counts[kind] = ReaderCount(**json.loads(out.splitlines()[-1]))
        return ReaderRun(len(seen) - 1, seconds, counts)
    finally:
        for reader in readers.values():
            if reader.poll() is None:
                reader.kill()
                reader.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    read = sub.add_parser("read", help="one reader process, until SIGTERM; JSON counts on stdout")
    read.add_argument("kind", choices=READER_KINDS)
    read.add_argument("dir", type=Path)
    read.add_argument("--pause", type=float, default=0.001, help="seconds between reads")
    drive = sub.add_parser("drive", help="readers of every kind while PID renews N times")
    drive.add_argument("--pid", type=int, required=True)
    drive.add_argument("--dir", type=Path, required=True)
    drive.add_argument("--renewals", type=int, default=1000)
    drive.add_argument("--timeout", type=float, default=600)
    drive.add_argument("--every", type=float, default=0.02, help="seconds between SIGUSR1s")
    drive.add_argument("--pause", type=float, default=0.001, help="readers' seconds between reads")
    args = parser.parse_args(argv)
    if args.command == "read":
        print(json.dumps(asdict(reader_loop(args.kind, args.dir, args.pause))))
    else:
        run = run_readers(
            args.pid,
            args.dir,
            args.renewals,
            timeout=args.timeout,
            every=args.every,
            pause=args.pause,
        )
        print(json.dumps(asdict(run)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
