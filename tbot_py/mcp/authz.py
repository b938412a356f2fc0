"""The MCP authorization filter: pure functions over parsed JSON-RPC 2.0 messages.

The access proxy runs every client message through :func:`check_request` and answers a
denied ``tools/call`` itself with :func:`denial_response`, so the upstream server never
sees it. Every ``tools/list`` answer from the upstream goes through
:func:`filter_tools_list`, so the client only learns of tools it may call. Decisions come
from :func:`tbot_py.authservice.rbac.check_app_access` (deny wins; ``app_labels`` select
the app, ``mcp.tools`` the tool).

As in Teleport's MCP access, a denied call gets a JSON-RPC error with code -32602
(invalid params) whose message says access was denied and that roles enforce it; ours
also names the tool. Arguments of a call never appear in a denial or an audit field.
Fails closed: a ``tools/call`` without a usable tool name is denied, a ``tools/list``
result whose ``tools`` is not a list is replaced by an error.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from tbot_py.authservice.rbac import AccessDecision, check_app_access
from tbot_py.authservice.roles import Role
from tbot_py.config._checks import describe_type

JSONRPC_VERSION = "2.0"
METHOD_TOOLS_CALL = "tools/call"
METHOD_TOOLS_LIST = "tools/list"
#: JSON-RPC "invalid params": the code Teleport's MCP access answers a denied tool call with.
ACCESS_DENIED_CODE = -32602
#: JSON-RPC "internal error": a ``tools/list`` result the filter cannot read.
INTERNAL_ERROR_CODE = -32603
_ADVICE = "RBAC is enforced by your roles; contact your cluster administrator for more details."

#: A parsed JSON-RPC message: one JSON object.
Message = dict[str, Any]


@dataclass(frozen=True)
class MCPDecision:
    """Whether one client message may reach the upstream; ``tool`` is set for ``tools/call``."""

    allowed: bool
    tool: str | None
    reason: str


class ToolPolicy:
    """What the holder of ``roles`` may do on one MCP app: reach it at all, call which tools."""

    def __init__(self, roles: Sequence[Role], app_name: str, app_labels: Mapping[str, str]):
        self.roles = tuple(roles)
        self.app_name = app_name
        self.app_labels = dict(app_labels)

    def app_allowed(self) -> AccessDecision:
        """May the roles use this app at all (``app_labels`` only)?"""
        return check_app_access(self.roles, self.app_name, self.app_labels)

    def tool_allowed(self, tool: str) -> AccessDecision:
        """May the roles call ``tool`` on this app? An empty name is never allowed."""
        if not tool:
            return AccessDecision(False, "the tool name is empty")
        return check_app_access(self.roles, self.app_name, self.app_labels, tool)


def iter_requests(payload: object) -> list[Message]:
    """The messages of a parsed payload: one JSON-RPC object or a non-empty batch of them.

    Raises ValueError for anything else, so a batch cannot smuggle a non-object past
    the filter.
    """
    if isinstance(payload, dict):
        return [payload]
    if not isinstance(payload, list):
        raise ValueError(
            f"a JSON-RPC payload must be an object or an array, not {describe_type(payload)}"
        )
    if not payload:
        raise ValueError("a JSON-RPC batch must not be empty")
    for index, item in enumerate(payload):
        if not isinstance(item, dict):
            raise ValueError(
                f"JSON-RPC batch element {index} must be an object, not {describe_type(item)}"
            )
    return list(payload)


def check_request(message: Message, policy: ToolPolicy) -> MCPDecision:
    """May this client-to-server message be forwarded? Only ``tools/call`` is checked.

    Any other method (and a client's response, which has none) is allowed with tool None;
    a ``method`` that is not a string is denied rather than forwarded.
    """
    method = message.get("method")
    if method is None:
        return MCPDecision(True, None, "not a request")
    if not isinstance(method, str):
        return MCPDecision(False, None, f"the method is {describe_type(method)}, not a string")
    if method != METHOD_TOOLS_CALL:
        return MCPDecision(True, None, f"method {method} needs no tool check")
    params = message.get("params")
    if not isinstance(params, dict):
        return MCPDecision(False, None, "tools/call has no params object naming the tool")
    name = params.get("name")
    if not isinstance(name, str):
        return MCPDecision(False, None, "tools/call params.name is missing or not a string")
    decision = policy.tool_allowed(name)
    return MCPDecision(decision.allowed, name, decision.reason)


def denial_response(request: Message, decision: MCPDecision) -> Message:
    """The JSON-RPC error answering a denied request: same id, names the tool, no arguments."""
    what = f"MCP tool {_quote(decision.tool)}" if decision.tool is not None else "MCP request"
    message = f"access denied to {what}: {_one_line(decision.reason)}. {_ADVICE}"
    return {
        "jsonrpc": JSONRPC_VERSION,
        "id": request.get("id"),
        "error": {"code": ACCESS_DENIED_CODE, "message": message},
    }


def filter_tools_list(response: Message, policy: ToolPolicy) -> tuple[Message, list[str]]:
    """A ``tools/list`` answer with only the allowed tools, and the names removed.

    Order and every other field (``nextCursor``, ``_meta``) are kept; the input is not
    modified. A message without a ``result.tools`` entry (an error response, say) is
    returned unchanged. A tool entry without a non-empty string ``name`` is dropped
    (and not listed, having no name). A ``tools`` that is not a list cannot be filtered,
    so the answer becomes an internal error instead of reaching the client.
    """
    result = response.get("result")
    if not isinstance(result, dict) or "tools" not in result:
        return response, []
    tools = result["tools"]
    if not isinstance(tools, list):
        error = {
            "code": INTERNAL_ERROR_CODE,
            "message": f"tools/list result.tools is {describe_type(tools)}, not a list",
        }
        return {"jsonrpc": JSONRPC_VERSION, "id": response.get("id"), "error": error}, []
    kept: list[Any] = []
    removed: list[str] = []
    for tool in tools:
        name = tool.get("name") if isinstance(tool, dict) else None
        if not isinstance(name, str) or not name:
            continue
        if policy.tool_allowed(name).allowed:
            kept.append(tool)
        else:
            removed.append(name)
    return {**response, "result": {**result, "tools": kept}}, removed


def audit_fields(message: Message, decision: MCPDecision) -> dict[str, str]:
    """``method``, ``tool`` (when there is one), ``allowed`` and ``reason`` for an audit line."""
    method = message.get("method")
    fields = {"method": method if isinstance(method, str) else ""}
    if decision.tool is not None:
        fields["tool"] = decision.tool
    fields["allowed"] = "true" if decision.allowed else "false"
    fields["reason"] = decision.reason
    return fields


def _quote(text: str) -> str:
    """``text`` in double quotes, control characters escaped, so a name stays on one line."""
    return json.dumps(text, ensure_ascii=False)


def _one_line(text: str) -> str:
    return " ".join(text.split())
