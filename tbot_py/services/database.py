"""The ``database`` output service: a TLS client certificate routed to one database service.

Per cycle (tbot.md §2.3): issue an impersonated TLS certificate whose subject carries
Teleport's RouteToDatabase (service 1.3.9999.2.1, user 2.3, database 2.4) for a fresh
key, and write tbot's artifacts for the configured ``format``:

* always ``tlscert``, ``key`` and ``teleport-database-ca.crt``;
* ``tls``: also ``tls.key``, ``tls.crt``, ``tls.cas``;
* ``mongo``: also ``mongo.crt`` (certificate then key) and ``mongo.cas``;
* ``cockroach``: also ``cockroach/node.crt``, ``cockroach/node.key`` and
  ``cockroach/ca.crt``, in a subdirectory (a directory destination publishes it
  with the rest of the set, behind one link ``cockroach -> ..data/cockroach``).

``tls.cas`` holds the host CA (what a client verifies the proxy with) and ``mongo.cas`` the
database CA, as tbot writes them (lib/tbot/services/database/output_service.go: "Mongo
format specifically uses database CAs rather than hostCAs"). ``cockroach/ca.crt`` is the
database CA too (tbot's ``writeCockroachDatabaseFiles``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Literal

from tbot_py.identity.artifacts import DATABASE_CA_FILE
from tbot_py.identity.model import ARTIFACT_KEY, ARTIFACT_TLS_CERT
from tbot_py.services.application import (
    ARTIFACT_TLS_CAS,
    ARTIFACT_TLS_CRT,
    ARTIFACT_TLS_KEY,
    ca_pems,
    issue_routed,
)
from tbot_py.services.base import BotContext, DestinationOutput, GenerateResult, write_output

log = logging.getLogger("tbot_py.services.database")

ARTIFACT_MONGO_CRT = "mongo.crt"
ARTIFACT_MONGO_CAS = "mongo.cas"
COCKROACH_DIR = "cockroach"
ARTIFACT_COCKROACH_CRT = f"{COCKROACH_DIR}/node.crt"
ARTIFACT_COCKROACH_KEY = f"{COCKROACH_DIR}/node.key"
ARTIFACT_COCKROACH_CA = f"{COCKROACH_DIR}/ca.crt"

DatabaseFormat = Literal["", "tls", "mongo", "cockroach"]


@dataclass(frozen=True)
class DatabaseOutputSettings:
    """The parts of a ``database`` service's config this service acts on."""

    name: str
    service: str
    database: str
    username: str
    format: DatabaseFormat
    ttl: timedelta


class DatabaseService(DestinationOutput[DatabaseOutputSettings]):
    """Writes tbot's ``database`` artifacts to one destination."""

    async def generate(self, bot: BotContext) -> GenerateResult:
        """Issue a certificate routed to the database service and write the artifacts."""
        s = self.settings
        routed = await issue_routed(
            bot, s.ttl, db_service=s.service, db_user=s.username, db_name=s.database
        )
        files = {
            ARTIFACT_TLS_CERT: routed.cert_pem,
            ARTIFACT_KEY: routed.key_pem,
            DATABASE_CA_FILE: ca_pems(bot, "db"),
        }
        if s.format == "tls":
            files[ARTIFACT_TLS_KEY] = routed.key_pem
            files[ARTIFACT_TLS_CRT] = routed.cert_pem
            files[ARTIFACT_TLS_CAS] = ca_pems(bot, "host")
        elif s.format == "mongo":
            files[ARTIFACT_MONGO_CRT] = routed.cert_pem + routed.key_pem
            files[ARTIFACT_MONGO_CAS] = ca_pems(bot, "db")
        elif s.format == "cockroach":
            files[ARTIFACT_COCKROACH_CRT] = routed.cert_pem
            files[ARTIFACT_COCKROACH_KEY] = routed.key_pem
            files[ARTIFACT_COCKROACH_CA] = ca_pems(bot, "db")
        return await write_output(
            self.name,
            self.destination,
            files,
            routed.validity,
            what=f"{routed.identity.username}, database service {s.service}",
            log=log,
        )
