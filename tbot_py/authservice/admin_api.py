"""The remote admin API under ``/v1/admin/``: the admin commands over mTLS.

Only a certificate of this cluster in the ``tbot-py-admin`` group that is not a
bot certificate may call it (:func:`.mtls.check_admin_certificate`); anything
else gets 403. Each handler calls the same :mod:`.admin` function as the local
command, inside :func:`.audit.acting_as`, so every change is audited with the
actor ``{"admin": "remote", "user": <certificate CN>}``. Responses are the
JSON the local commands print with ``--format json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from aiohttp import web

from tbot_py.authservice import admin, audit
from tbot_py.authservice.cluster import Cluster
from tbot_py.authservice.errors import AccessDenied, BadParameter
from tbot_py.authservice.mtls import check_admin_certificate
from tbot_py.authservice.resource_kinds import ALL_KINDS, ResourceKind
from tbot_py.authservice.roles import parse_role_yaml
from tbot_py.errors import ConfigError

PREFIX = "/v1/admin"

T = TypeVar("T")
Clock = Callable[[], datetime]
ReadJSON = Callable[[web.Request], Any]
Handler = Callable[[web.Request], Awaitable[web.Response]]


class AdminAPI:
    """The admin handlers, bound to one opened cluster."""

    def __init__(self, cluster: Cluster, clock: Clock, read_json: ReadJSON) -> None:
        self.cluster = cluster
        self.clock = clock
        self._read_json = read_json

    def _admin_user(self, request: web.Request) -> str:
        """The admin calling, by certificate CN; AccessDenied (403) for anyone else.

        A refused caller is audited (``admin.api``, with what it was told): denials on
        the admin API are exactly what an audit trail is for.
        """
        ssl_object = request.transport.get_extra_info("ssl_object") if request.transport else None
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        try:
            return check_admin_certificate(der, self.cluster.cas, self.clock()).username
        except AccessDenied as exc:
            audit.AuditLog(audit.audit_log_path(self.cluster.data_dir)).record(
                audit.AuditEvent(
                    time=datetime.now(UTC),
                    event="admin.api",
                    success=False,
                    code=exc.status,
                    actor={},
                    remote_addr=request.remote,
                    resource=f"{request.method} {request.path}",
                    message=exc.message,
                )
            )
            raise

    async def _run(self, request: web.Request, func: Callable[[], T]) -> T:
        """Check the caller, then run ``func`` in a thread with the caller as the audit actor."""
        with audit.acting_as(audit.remote_admin_actor(self._admin_user(request))):
            # to_thread copies the context, so the actor goes with the call.
            return await asyncio.to_thread(func)

    async def _body(self, request: web.Request) -> dict[str, Any]:
        """The JSON object a request carries, read only once the caller is an admin."""
        self._admin_user(request)
        doc = await self._read_json(request)
        if not isinstance(doc, dict):
            raise BadParameter("request body must be a JSON object")
        return doc

    async def list_bots(self, request: web.Request) -> web.Response:
        """``GET bots``: as ``bots ls --format json``."""
        found = await self._run(request, lambda: admin.list_bots(self.cluster))
        return web.json_response([admin.bot_summary_json(s) for s in found])

    async def add_bot(self, request: web.Request) -> web.Response:
        """``POST bots`` {name, roles, logins, ttl}: as ``bots add --format json``."""
        body = await self._body(request)
        name = _text(body, "name")
        roles = admin.parse_name_list(",".join(_names(body, "roles")), "role")
        logins = admin.parse_name_list(",".join(_names(body, "logins")), "login")
        ttl = admin.parse_go_duration(_text(body, "ttl", "1h"))
        created = await self._run(
            request,
            lambda: admin.add_bot(self.cluster, name, roles=roles, logins=logins, token_ttl=ttl),
        )
        return web.json_response(created.to_json())

    async def remove_bot(self, request: web.Request) -> web.Response:
        """``DELETE bots/{name}``."""
        name = request.match_info["name"]
        await self._run(request, lambda: admin.remove_bot(self.cluster, name))
        return web.json_response({"bot_name": name})

    async def update_bot(self, request: web.Request) -> web.Response:
        """``PATCH bots/{name}`` {add_roles, remove_roles}: as ``bots update --format json``."""
        name = request.match_info["name"]
        body = await self._body(request)
        add = admin.parse_name_list(",".join(_names(body, "add_roles")), "role")
        remove = admin.parse_name_list(",".join(_names(body, "remove_roles")), "role")
        bot = await self._run(
            request, lambda: admin.update_bot_roles(self.cluster, name, add=add, remove=remove)
        )
        return web.json_response(admin.bot_json(bot))

    async def list_instances(self, request: web.Request) -> web.Response:
        """``GET bots/{name}/instances``: as ``bots instances ls --format json``."""
        name = request.match_info["name"]
        found = await self._run(request, lambda: admin.list_instances(self.cluster, name))
        return web.json_response([admin.instance_json(i) for i in found])

    async def add_token(self, request: web.Request) -> web.Response:
        """``POST tokens`` {bot, ttl}: as ``tokens add --format json``."""
        body = await self._body(request)
        bot = _text(body, "bot")
        ttl = admin.parse_go_duration(_text(body, "ttl", "1h"))
        issued = await self._run(request, lambda: admin.add_token(self.cluster, bot, ttl=ttl))
        return web.json_response(issued.to_json())

    async def list_tokens(self, request: web.Request) -> web.Response:
        """``GET tokens``: as ``tokens ls --format json``."""
        records = await self._run(request, lambda: admin.list_tokens(self.cluster))
        now = self.clock()
        return web.json_response([admin.token_json(r, now) for r in records])

    async def remove_token(self, request: web.Request) -> web.Response:
        """``DELETE tokens/{id}``: {id, bot_name} of the removed token."""
        token_id = request.match_info["id"]
        removed = await self._run(request, lambda: admin.remove_token(self.cluster, token_id))
        return web.json_response(admin.removed_token_json(removed))

    async def list_locks(self, request: web.Request) -> web.Response:
        """``GET locks``: as ``locks ls --format json``."""
        records = await self._run(request, lambda: admin.list_locks(self.cluster))
        now = self.clock()
        return web.json_response([admin.lock_json(lock, now) for lock in records])

    async def add_lock(self, request: web.Request) -> web.Response:
        """``POST locks`` {bot | instance, message, ttl}: as ``locks add --format json``."""
        body = await self._body(request)
        ttl_text = _optional_text(body, "ttl")
        ttl = admin.parse_go_duration(ttl_text) if ttl_text is not None else None
        bot, instance = _optional_text(body, "bot"), _optional_text(body, "instance")
        message = _optional_text(body, "message")
        lock = await self._run(
            request,
            lambda: admin.add_lock(
                self.cluster, bot=bot, instance=instance, message=message, ttl=ttl
            ),
        )
        return web.json_response(admin.lock_json(lock, self.clock()))

    async def remove_lock(self, request: web.Request) -> web.Response:
        """``DELETE locks/{id}``: the removed lock."""
        lock_id = request.match_info["id"]
        lock = await self._run(request, lambda: admin.remove_lock(self.cluster, lock_id))
        return web.json_response(admin.lock_json(lock, self.clock()))

    async def create_role(self, request: web.Request) -> web.Response:
        """``POST roles`` {yaml, force}: {name, replaced}."""
        body = await self._body(request)
        force = body.get("force", False)
        if not isinstance(force, bool):
            raise BadParameter("force must be true or false")
        try:
            role = parse_role_yaml(_text(body, "yaml"), source="<request>")
        except ConfigError as exc:
            raise BadParameter(str(exc)) from None
        replaced = await self._run(
            request, lambda: admin.create_role(self.cluster, role, force=force)
        )
        return web.json_response({"name": role.name, "replaced": replaced})

    async def list_roles(self, request: web.Request) -> web.Response:
        """``GET roles``: as ``get roles --format json``."""
        roles = await self._run(request, lambda: admin.list_roles(self.cluster))
        return web.json_response([role.to_json() for role in roles])

    async def get_role(self, request: web.Request) -> web.Response:
        """``GET roles/{name}``: {role: the JSON form, yaml: the YAML form}."""
        name = request.match_info["name"]
        role = await self._run(request, lambda: admin.get_role(self.cluster, name))
        return web.json_response({"role": role.to_json(), "yaml": role.to_yaml()})

    async def delete_role(self, request: web.Request) -> web.Response:
        """``DELETE roles/{name}``."""
        name = request.match_info["name"]
        await self._run(request, lambda: admin.delete_role(self.cluster, name))
        return web.json_response({"name": name})

    def resource_handlers(self, kind: ResourceKind[Any]) -> dict[str, Handler]:
        """The handlers of one stored kind under ``/v1/admin/<kind.api_path>``.

        ``POST`` {yaml, force} → {name, replaced}; ``GET`` → the list as ``get PLURAL
        --format json``; ``GET /{name}`` → {<kind>: JSON form, yaml: YAML form};
        ``DELETE /{name}`` → {name}.
        """

        async def create(request: web.Request) -> web.Response:
            body = await self._body(request)
            force = body.get("force", False)
            if not isinstance(force, bool):
                raise BadParameter("force must be true or false")
            try:
                resource = kind.parse_yaml(_text(body, "yaml"), "<request>")
            except ConfigError as exc:
                raise BadParameter(str(exc)) from None
            replaced = await self._run(
                request, lambda: admin.create_resource(self.cluster, resource, force=force)
            )
            return web.json_response({"name": resource.name, "replaced": replaced})

        async def list_all(request: web.Request) -> web.Response:
            found = await self._run(request, lambda: admin.list_resources(self.cluster, kind))
            return web.json_response([resource.to_json() for resource in found])

        async def get(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            found = await self._run(request, lambda: admin.get_resource(self.cluster, kind, name))
            return web.json_response({kind.kind: found.to_json(), "yaml": found.to_yaml()})

        async def delete(request: web.Request) -> web.Response:
            name = request.match_info["name"]
            await self._run(request, lambda: admin.delete_resource(self.cluster, kind, name))
            return web.json_response({"name": name})

        return {"create": create, "list": list_all, "get": get, "delete": delete}


def add_admin_routes(app: web.Application, api: AdminAPI) -> None:
    """Register the ``/v1/admin/`` endpoints on ``app``."""
    router = app.router
    router.add_get(f"{PREFIX}/bots", api.list_bots)
    router.add_post(f"{PREFIX}/bots", api.add_bot)
    router.add_delete(f"{PREFIX}/bots/{{name}}", api.remove_bot)
    router.add_patch(f"{PREFIX}/bots/{{name}}", api.update_bot)
    router.add_get(f"{PREFIX}/bots/{{name}}/instances", api.list_instances)
    router.add_post(f"{PREFIX}/tokens", api.add_token)
    router.add_get(f"{PREFIX}/tokens", api.list_tokens)
    router.add_delete(f"{PREFIX}/tokens/{{id}}", api.remove_token)
    router.add_get(f"{PREFIX}/locks", api.list_locks)
    router.add_post(f"{PREFIX}/locks", api.add_lock)
    router.add_delete(f"{PREFIX}/locks/{{id}}", api.remove_lock)
    router.add_post(f"{PREFIX}/roles", api.create_role)
    router.add_get(f"{PREFIX}/roles", api.list_roles)
    router.add_get(f"{PREFIX}/roles/{{name}}", api.get_role)
    router.add_delete(f"{PREFIX}/roles/{{name}}", api.delete_role)
    for kind in ALL_KINDS:
        handlers = api.resource_handlers(kind)
        router.add_post(f"{PREFIX}/{kind.api_path}", handlers["create"])
        router.add_get(f"{PREFIX}/{kind.api_path}", handlers["list"])
        router.add_get(f"{PREFIX}/{kind.api_path}/{{name}}", handlers["get"])
        router.add_delete(f"{PREFIX}/{kind.api_path}/{{name}}", handlers["delete"])


def _optional_text(body: dict[str, Any], key: str) -> str | None:
    value = body.get(key)
    if value is not None and not isinstance(value, str):
        raise BadParameter(f"{key} must be a string")
    return value


def _text(body: dict[str, Any], key: str, default: str | None = None) -> str:
    value = _optional_text(body, key)
    if value is None:
        if default is None:
            raise BadParameter(f"{key} is required")
        return default
    return value


def _names(body: dict[str, Any], key: str) -> list[str]:
    value = body.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadParameter(f"{key} must be a list of strings")
    return value
