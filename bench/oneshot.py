"""One-shot start to finish: ``tbot-py start identity --oneshot`` as a whole process.

Two cases against a real local auth service: a *cold join* (fresh storage, a fresh
single-use token each run) and a *warm renewal* (the stored identity renews over mTLS).
The baseline is ``python -c pass`` on the same interpreter, run interleaved with ours
(base, cold, warm, floor, base, cold, ...) so load drift hits all alike; the floor imports
only what any one-shot needs (TLS, X.509, EC keys), to show what no import trimming removes.

A second, shorter pass runs the same three under ``-X importtime`` (``PYTHONPROFILEIMPORTTIME``)
to split our wall time into interpreter start, imports and the rest (the in-process share:
keys, TLS, the auth service's answer, writing files) and to list the packages that cost
the most to import.
"""

from __future__ import annotations

import itertools
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from common import (
    PYTHON,
    TBOT,
    AuthService,
    Context,
    Row,
    Stats,
    auth_service,
    clean_env,
)

if TYPE_CHECKING:
    from cryptography import x509

NAME = "one-shot"
BASELINE = "python -c pass"
TARGET_WARM = 2.0  # warm renewal <= 2x the baseline
TARGET_COLD = 2.5  # cold join <= 2.5x the baseline
TOP_PACKAGES = 10
#: What any one-shot needs whatever else it trims: TLS, X.509 and EC keys.
FLOOR_IMPORTS = "ssl, cryptography.x509, cryptography.hazmat.primitives.asymmetric.ec"


def python_env(work: Path, **extra: str) -> dict[str, str]:
    """``clean_env`` for a measured Python process, with bytecode cached as when deployed.

    This machine sets PYTHONDONTWRITEBYTECODE and the editable install has no .pyc files,
    so without this every run would recompile tbot_py's sources (about 50 ms of CPU), which
    no installed tbot-py does. The cache lives in the work dir, not the source tree, and
    the warm-up runs fill it; the peers get the same environment.
    """
    env = clean_env(PYTHONPYCACHEPREFIX=str(work / "pycache"), **extra)
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


@dataclass
class Bot:
    """A bot on a running auth service, and the command lines of its one-shot runs."""

    auth: AuthService
    work: Path
    name: str = "bench"
    _tokens: list[str] = field(default_factory=list)
    _runs: itertools.count[int] = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        self._tokens.append(self.auth.add_bot(self.name))

    def cold(self, run: Path | None = None) -> tuple[list[str], dict[str, str], Path]:
        """A cold join: a fresh single-use token (minted now, untimed), fresh storage and output."""
        token = self._tokens.pop() if self._tokens else self.auth.add_token(self.name)
        run = run or self.work / f"cold-{next(self._runs)}"
        argv = [*self._argv(run), "--ca-pin", self.auth.ca_pin]
        # The token goes in the environment, as the README asks, never in argv.
        return argv, python_env(self.work, TELEPORT_BOT_TOKEN=token), run / "out"

    def warm(self) -> tuple[list[str], dict[str, str], Path]:
        """A warm renewal of one stored identity (joined once, untimed, on first use)."""
        run = self.work / "warm"
        if not run.exists():
            argv, env, _ = self.cold(run)
            subprocess.run(argv, env=env, capture_output=True, check=True)
        return self._argv(run), python_env(self.work), run / "out"

    def _argv(self, run: Path) -> list[str]:
        return [
            TBOT, "start", "identity", "--proxy-server", self.auth.addr, "--oneshot",
            "--storage", str(run / "storage"), "--destination", str(run / "out"),
        ]  # fmt: skip


def verify_identity(out: Path) -> None:
    """Raise unless ``out`` holds a usable identity: a TLS certificate signed by the cluster's
    user CA and valid now, and a validly signed SSH certificate, both for the key beside them."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
    from cryptography.hazmat.primitives.serialization import ssh

    def spki(public_key: PublicKeyTypes) -> bytes:
        return public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    cert = x509.load_pem_x509_certificate((out / "tlscert").read_bytes())
    cas = x509.load_pem_x509_certificates((out / "teleport-user-ca.crt").read_bytes())
    key = serialization.load_pem_private_key((out / "key").read_bytes(), password=None)
    if spki(cert.public_key()) != spki(key.public_key()):
        raise RuntimeError(f"{out}: tlscert is not for the key written beside it")
    if not any(_issued_by(cert, ca) for ca in cas):
        raise RuntimeError(f"{out}: tlscert is not signed by teleport-user-ca.crt")
    if not cert.not_valid_before_utc <= datetime.now(UTC) <= cert.not_valid_after_utc:
        raise RuntimeError(f"{out}: tlscert is not valid now")
    ssh_cert = ssh.load_ssh_public_identity((out / "key-cert.pub").read_bytes())
    if not isinstance(ssh_cert, ssh.SSHCertificate):
        raise RuntimeError(f"{out}: key-cert.pub is not an SSH certificate")
    ssh_cert.verify_cert_signature()
    if spki(ssh_cert.public_key()) != spki(key.public_key()):
        raise RuntimeError(f"{out}: key-cert.pub is not for the key written beside it")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    from cryptography.exceptions import InvalidSignature

    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


@dataclass(frozen=True)
class Import:
    """One line of ``-X importtime``: microseconds spent in the module, with what it imported."""

    name: str
    level: int
    self_us: int
    cumulative_us: int
    parent: str | None


def parse_importtime(stderr: str) -> list[Import]:
    """The ``-X importtime`` lines of ``stderr``, each with the module that imported it.

    Python prints a module after everything it imported (post-order), so read backwards:
    an entry's parent is the nearest earlier-read entry one level up.
    """
    rows: list[tuple[str, int, int, int]] = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "[us]" in line:
            continue
        own, cumulative, name = line[len("import time:") :].split("|", 2)
        level = (len(name) - len(name.lstrip(" ")) - 1) // 2
        rows.append((name.strip(), level, int(own), int(cumulative)))
    parsed: list[Import] = []
    stack: list[tuple[int, str]] = []
    for name, level, self_us, cumulative_us in reversed(rows):
        while stack and stack[-1][0] >= level:
            stack.pop()
        parsed.append(Import(name, level, self_us, cumulative_us, stack[-1][1] if stack else None))
        stack.append((level, name))
    parsed.reverse()
    return parsed


def import_total_ms(imports: list[Import]) -> float:
    """Everything imported, in ms: the sum of the top-level entries' cumulative times."""
    return sum(i.cumulative_us for i in imports if i.level == 0) / 1000


@dataclass
class PackageCost:
    """What importing one top-level package cost in one run, in ms."""

    cumulative: float = 0.0  # entries into the package from outside, with what they pulled in
    own: float = 0.0  # the package's own modules only, so these add up
    via: str = ""  # the module whose import of it cost the most


def by_package(imports: list[Import]) -> dict[str, PackageCost]:
    """Per top-level package, what its imports cost (pydantic's cumulative includes its core's)."""
    costs: dict[str, PackageCost] = {}
    largest: dict[str, int] = {}
    for i in imports:
        package = i.name.split(".")[0]
        cost = costs.setdefault(package, PackageCost())
        cost.own += i.self_us / 1000
        if i.parent is None or i.parent.split(".")[0] != package:
            cost.cumulative += i.cumulative_us / 1000
            if i.cumulative_us > largest.get(package, -1):
                largest[package] = i.cumulative_us
                cost.via = i.parent or "run time"
    return costs


@dataclass(frozen=True)
class Measured:
    """One whole process: wall time, and CPU time (user + system, with its children), in ms."""

    wall_ms: float
    cpu_ms: float
    stderr: str


def measure(argv: list[str], env: dict[str, str]) -> Measured:
    """Run ``argv`` to completion and measure it; raise with its stderr if it fails.

    CPU time is read from RUSAGE_CHILDREN around the run: the runner starts nothing else
    meanwhile (the auth service and pebble are reaped only at the end). It is far less
    sensitive to other load on the machine than wall time.
    """
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = (time.perf_counter() - start) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{argv[:3]} failed: {done.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return Measured(wall, cpu * 1000, done.stderr)


def run_importtime(argv: list[str], env: dict[str, str]) -> tuple[float, list[Import]]:
    """Wall ms and the parsed ``-X importtime`` report of one run."""
    done = measure(argv, {**env, "PYTHONPROFILEIMPORTTIME": "1"})
    return done.wall_ms, parse_importtime(done.stderr)


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else 0.0


def _package_table(runs: list[list[Import]], baseline: set[str]) -> str:
    """The top packages by median cumulative import ms, and our own slowest modules, as notes."""
    tables = [by_package(imports) for imports in runs]
    packages = {p for table in tables for p in table} - baseline - {"tbot_py"}
    none = PackageCost()
    cumulative = {p: _median([t.get(p, none).cumulative for t in tables]) for p in packages}
    cells = [
        f"{p}{' (stdlib)' if p in sys.stdlib_module_names else ''} {cumulative[p]:.0f} ms "
        f"(self {_median([t.get(p, none).own for t in tables]):.0f}, "
        f"via {next(t[p].via for t in tables if p in t)})"
        for p in sorted(packages, key=lambda p: -cumulative[p])[:TOP_PACKAGES]
    ]
    ours = {
        i.name: _median([j.self_us / 1000 for imports in runs for j in imports if j.name == i.name])
        for i in runs[0]
        if i.name.startswith("tbot_py")
    }
    slowest = sorted(ours, key=lambda name: -ours[name])[:3]
    return (
        f"top {TOP_PACKAGES} packages by cumulative import time, median of {len(runs)} "
        "-X importtime runs (cumulative: entries into the package with what they pulled in, "
        "so pydantic includes pydantic_core; self: the package's own modules; via: who "
        "imported it): "
        + "; ".join(cells)
        + f". tbot_py's own modules: self {_median([t['tbot_py'].own for t in tables]):.0f} ms, "
        "most in "
        + ", ".join(f"{name} {ours[name]:.0f} ms" for name in slowest)
        + " (self time includes class bodies run at import, e.g. pydantic building models)"
    )


#: A process to time: argv, environment, and the output directory to verify (if any).
Command = tuple[list[str], dict[str, str], Path | None]


def run(ctx: Context) -> list[Row]:
    env = python_env(ctx.work)
    base: Command = ([PYTHON, "-c", "pass"], env, None)
    floor: Command = ([PYTHON, "-c", f"import {FLOOR_IMPORTS}"], env, None)
    times: dict[str, list[Measured]] = {"base": [], "cold": [], "warm": [], "floor": []}
    # The breakdown pass: (wall ms, import ms) of base, cold and warm under -X importtime.
    split: dict[str, list[tuple[float, float]]] = {"base": [], "cold": [], "warm": []}
    cold_imports: list[list[Import]] = []
    baseline_packages: set[str] = set()
    with auth_service(ctx.work / "auth") as auth:
        bot = Bot(auth, ctx.work)
        rounds = ctx.reps(11, 3)
        ctx.log(f"   timing {ctx.warmup} warm-up + {rounds} rounds of base/cold/warm/floor")
        for round_ in range(ctx.warmup + rounds):
            commands: list[tuple[str, Command]] = [
                ("base", base), ("cold", bot.cold()), ("warm", bot.warm()), ("floor", floor),
            ]  # fmt: skip
            for case, (argv, env, out) in commands:
                measured = measure(argv, env)
                if out is not None:
                    verify_identity(out)
                if round_ >= ctx.warmup:
                    times[case].append(measured)
        for _ in range(ctx.reps(3, 1)):
            commands = [("base", base), ("cold", bot.cold()), ("warm", bot.warm())]
            for case, (argv, env, out) in commands:
                wall, imports = run_importtime(argv, env)
                if out is not None:
                    verify_identity(out)
                split[case].append((wall, import_total_ms(imports)))
                if case == "cold":
                    cold_imports.append(imports)
                if case == "base":
                    baseline_packages |= {i.name.split(".")[0] for i in imports}

    def stats(case: str, cpu: bool = False) -> Stats:
        return Stats.of([m.cpu_ms if cpu else m.wall_ms for m in times[case]])

    def cpu_note(case: str) -> str:
        ours, base_cpu = stats(case, cpu=True), stats("base", cpu=True)
        return (
            f"CPU (user+system) {ours.text('ms', 0)}, {ours.median / base_cpu.median:.1f}x the "
            f"baseline's {base_cpu.median:.0f} ms (CPU time moves far less with other load)"
        )

    baseline = stats("base")
    rows = []
    for case, key, target, how in (
        ("warm renewal", "warm", TARGET_WARM, "renewing one stored identity"),
        ("cold join", "cold", TARGET_COLD, "fresh storage and a fresh token each run"),
    ):
        ours = stats(key)
        ratio = ours.median / baseline.median
        rows.append(Row(
            NAME, f"{case}, whole process", ours.median, "ms", ours_text=ours.text("ms"),
            peer=BASELINE, peer_value=baseline.median, peer_text=f"baseline {baseline.text('ms')}",
            ratio=ratio, ratio_text="ours/baseline, lower is better", target=f"<= {target:g}x",
            passed=ratio <= target,
            notes=f"tbot-py start identity --oneshot against a local auth service process, {how}; "
            f"interleaved with the baseline on the same interpreter ({PYTHON}), bytecode cached "
            f"(PYTHONPYCACHEPREFIX in the work dir, filled by the warm-up); {cpu_note(key)}",
        ))  # fmt: skip
    least = stats("floor")
    rows.append(Row(
        NAME, "floor: the least a one-shot must import", least.median, "ms",
        ours_text=least.text("ms"), peer=BASELINE, peer_value=baseline.median,
        ratio=least.median / baseline.median, ratio_text="floor/baseline", passed=None,
        notes=f"python -c 'import {FLOOR_IMPORTS}' (TLS, X.509, EC keys), interleaved with the "
        f"runs above: what no trimming of other imports can remove; {cpu_note('floor')}",
    ))  # fmt: skip
    rows += [
        _share_row("warm renewal", split["warm"], split["base"]),
        _share_row("cold join", split["cold"], split["base"]),
    ]
    beyond = Stats.of(
        [i - bi for (_, i), (_, bi) in zip(split["cold"], split["base"], strict=True)]
    )
    rows.append(Row(
        NAME, "cold join, import time beyond the baseline's", beyond.median, "ms",
        ours_text=beyond.text("ms") + " under -X importtime (which slows imports a little)",
        passed=None, notes=_package_table(cold_imports, baseline_packages),
    ))  # fmt: skip
    return rows


def _share_row(case: str, ours: list[tuple[float, float]], base: list[tuple[float, float]]) -> Row:
    """The in-process share: our wall time minus interpreter start and exit and all imports.

    Interpreter start and exit is the baseline's wall time minus the baseline's own imports
    (site and the editable-install finder, which every run of this interpreter pays).
    """
    rest = Stats.of([(w - i) - (bw - bi) for (w, i), (bw, bi) in zip(ours, base, strict=True)])
    wall = statistics.median(w for w, _ in ours)
    start = statistics.median(bw - bi for bw, bi in base)
    imports = statistics.median(i for _, i in ours)
    beyond = imports - statistics.median(bi for _, bi in base)
    return Row(
        NAME, f"{case}, excluding interpreter start and imports", rest.median, "ms",
        ours_text=rest.text("ms"), passed=None,
        notes=f"medians of -X importtime runs interleaved with the baseline: wall {wall:.0f} ms "
        f"= interpreter start and exit {start:.0f} ms + imports {imports:.0f} ms "
        f"({beyond:.0f} ms beyond the baseline's) + the rest {rest.median:.0f} ms "
        "(argument and config parsing, key generation, TLS, the auth service's answer, "
        "writing files). -X importtime inflates the imports, not the rest",
    )  # fmt: skip
