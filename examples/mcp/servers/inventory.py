"""A small MCP server over streamable HTTP, for the walkthrough: the ``inventory`` app.

    python3 examples/mcp/servers/inventory.py --auth-server 127.0.0.1:3025 \\
        --ca-file /opt/machine-id-proxy/teleport-host-ca.crt

It serves http://127.0.0.1:8000/mcp and accepts only requests that carry
``Authorization: Bearer <JWT>``, the header the access proxy adds (proxy.yaml,
``rewrite.headers``). The auth service signs that JWT for the MCP client's user: ES256,
keys at ``https://AUTH/.well-known/jwks.json`` (fetched with ``--ca-file``, the cluster's
host CA), ``iss`` = ``https://AUTH`` (its public address), ``aud`` = the app's URI exactly
as configured, ``sub`` = the user. Anything else gets 401, so a client that reaches this
port without going through the proxy gets nothing. ``--no-verify`` turns the check off
(for a first try only).
"""

from __future__ import annotations

import argparse
import asyncio
import ssl
import sys
from typing import Any, Protocol

import jwt
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.fastmcp import FastMCP
from pydantic import AnyHttpUrl

#: The app's URI in proxy.yaml: the ``aud`` its JWTs carry.
AUDIENCE = "mcp+http://127.0.0.1:8000/mcp"
HOST, PORT = "127.0.0.1", 8000

_ITEMS = {"sku-1": "cable, 40 in stock", "sku-2": "switch, 3 in stock"}


class SigningKeys(Protocol):
    """Where a JWT's verification key comes from (jwt.PyJWKClient, or a fixed key in tests)."""

    def get_signing_key_from_jwt(self, token: str) -> jwt.PyJWK: ...


class AuthServiceJWTVerifier:
    """Accepts a bearer token only if it is a JWT the auth service signed for this app."""

    def __init__(self, keys: SigningKeys, *, issuer: str, audience: str = AUDIENCE) -> None:
        self._keys = keys
        self.issuer = issuer
        self._audience = audience

    async def verify_token(self, token: str) -> AccessToken | None:
        """The token's user and expiry, or None (the server answers 401) if it is not valid."""
        try:
            # The JWKS fetch is blocking I/O (cached for 5 minutes): keep it off the loop.
            key = await asyncio.to_thread(self._keys.get_signing_key_from_jwt, token)
            claims: dict[str, Any] = jwt.decode(
                token,
                key,
                algorithms=["ES256"],
                audience=self._audience,
                issuer=self.issuer,
                options={"require": ["exp", "iat", "sub"]},
            )
        except (jwt.PyJWTError, OSError) as exc:
            print(f"inventory: refused a token: {exc}", file=sys.stderr)  # never the token
            return None
        return AccessToken(
            token=token,
            client_id=str(claims["sub"]),
            subject=str(claims["sub"]),
            scopes=[],
            expires_at=int(claims["exp"]),
        )


def build_server(verifier: AuthServiceJWTVerifier | None) -> FastMCP:
    """The inventory server; every request needs a valid JWT when ``verifier`` is given."""
    auth = None
    if verifier is not None:
        auth = AuthSettings(
            issuer_url=AnyHttpUrl(verifier.issuer),  # shown in its OAuth metadata only
            resource_server_url=AnyHttpUrl(f"http://{HOST}:{PORT}/mcp"),
            validate_token_resource=False,  # the verifier checks aud itself
        )
    server = FastMCP("inventory", host=HOST, port=PORT, auth=auth, token_verifier=verifier)

    @server.tool()
    def list_items() -> list[str]:
        """The SKUs in stock."""
        return sorted(_ITEMS)

    @server.tool()
    def get_item(sku: str) -> str:
        """One item's description and stock."""
        return _ITEMS.get(sku, f"no item {sku}")

    @server.tool()
    def delete_item(sku: str) -> str:
        """Remove an item: a write, which read-only roles deny."""
        return "deleted" if _ITEMS.pop(sku, None) is not None else f"no item {sku}"

    return server


def main(argv: list[str] | None = None) -> int:
    """``python3 inventory.py --auth-server HOST:PORT --ca-file PEM`` (or ``--no-verify``)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--auth-server", metavar="HOST:PORT", help="the auth service")
    parser.add_argument("--ca-file", help="the cluster's host CA (teleport-host-ca.crt)")
    parser.add_argument("--issuer", help="the JWTs' iss; default https://AUTH-SERVER")
    parser.add_argument("--no-verify", action="store_true", help="accept requests without a JWT")
    args = parser.parse_args(argv)
    verifier = None
    if not args.no_verify:
        if not (args.auth_server and args.ca_file):
            parser.error("give --auth-server and --ca-file, or --no-verify")
        context = ssl.create_default_context(cafile=args.ca_file)
        keys = jwt.PyJWKClient(
            f"https://{args.auth_server}/.well-known/jwks.json", ssl_context=context
        )
        issuer = args.issuer or f"https://{args.auth_server}"
        verifier = AuthServiceJWTVerifier(keys, issuer=issuer)
    build_server(verifier).run("streamable-http")
    return 0


if __name__ == "__main__":
    sys.exit(main())
