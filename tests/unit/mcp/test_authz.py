"""The MCP authorization filter: tools/call checks, tools/list filtering, denials, batches."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tbot_py.authservice.roles import Role, parse_role_yaml
from tbot_py.mcp.authz import (
    ACCESS_DENIED_CODE,
    INTERNAL_ERROR_CODE,
    ToolPolicy,
    audit_fields,
    check_request,
    denial_response,
    filter_tools_list,
    iter_requests,
)

DEV_LABELS = {"env": "dev"}
TOOLS = ["get_weather", "list_items", "delete_item"]


def role(name: str, allow: str, deny: str = "{}") -> Role:
    return parse_role_yaml(
        f"kind: role\nversion: v7\nmetadata: {{name: {name}}}\n"
        f"spec:\n  allow: {allow}\n  deny: {deny}\n"
    )


ALL_TOOLS = role("mcp-all", "{app_labels: {env: dev}, mcp: {tools: ['*']}}")
READ_ONLY = role(
    "mcp-readonly", "{app_labels: {env: dev}, mcp: {tools: ['^(get|query|list|search|find)_.*$']}}"
)
NO_DELETE = role("no-delete", "{}", "{mcp: {tools: ['delete_*']}}")


def policy(*roles: Role, labels: dict[str, str] | None = None) -> ToolPolicy:
    return ToolPolicy(roles, "weather", DEV_LABELS if labels is None else labels)


def tools_list(names: list[Any], **extra: Any) -> dict[str, Any]:
    tools = [{"name": n, "inputSchema": {"type": "object"}} for n in names]
    return {"jsonrpc": "2.0", "id": 7, "result": {"tools": tools, **extra}}


def call(name: object, arguments: object = None, msg_id: object = 3) -> dict[str, Any]:
    params: dict[str, object] = {"name": name}
    if arguments is not None:
        params["arguments"] = arguments
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}


def names(response: dict[str, Any]) -> list[str]:
    return [tool["name"] for tool in response["result"]["tools"]]


def test_allow_all_role_keeps_every_tool_and_allows_every_call() -> None:
    filtered, removed = filter_tools_list(tools_list(TOOLS), policy(ALL_TOOLS))
    assert names(filtered) == TOOLS
    assert removed == []
    assert check_request(call("delete_item"), policy(ALL_TOOLS)).allowed


def test_read_only_regex_role_keeps_only_read_tools_in_order() -> None:
    filtered, removed = filter_tools_list(tools_list(TOOLS), policy(READ_ONLY))
    assert names(filtered) == ["get_weather", "list_items"]
    assert removed == ["delete_item"]
    allowed = check_request(call("get_weather"), policy(READ_ONLY))
    assert (allowed.allowed, allowed.tool) == (True, "get_weather")
    assert 'allowed by role "mcp-readonly"' in allowed.reason
    denied = check_request(call("delete_item"), policy(READ_ONLY))
    assert (denied.allowed, denied.tool) == (False, "delete_item")
    assert "delete_item" in denied.reason


def test_deny_mcp_tools_wins_over_an_allow_all_role() -> None:
    both = policy(ALL_TOOLS, NO_DELETE)
    filtered, removed = filter_tools_list(tools_list(TOOLS), both)
    assert names(filtered) == ["get_weather", "list_items"]
    assert removed == ["delete_item"]
    denied = check_request(call("delete_item"), both)
    assert not denied.allowed
    assert 'denied by role "no-delete"' in denied.reason


def test_app_labels_not_matching_deny_the_app_and_every_tool() -> None:
    prod = policy(ALL_TOOLS, labels={"env": "prod"})
    assert not prod.app_allowed().allowed
    assert policy(ALL_TOOLS).app_allowed().allowed
    filtered, removed = filter_tools_list(tools_list(TOOLS), prod)
    assert names(filtered) == []
    assert removed == TOOLS
    assert not check_request(call("get_weather"), prod).allowed


def test_pagination_cursor_and_other_result_fields_are_kept() -> None:
    response = tools_list(TOOLS, nextCursor="page-2", _meta={"k": "v"})
    original = copy.deepcopy(response)
    filtered, _ = filter_tools_list(response, policy(READ_ONLY))
    assert filtered["result"]["nextCursor"] == "page-2"
    assert filtered["result"]["_meta"] == {"k": "v"}
    assert (filtered["jsonrpc"], filtered["id"]) == ("2.0", 7)
    assert response == original  # the input is not modified


def test_error_responses_and_results_without_tools_pass_through_unchanged() -> None:
    error = {"jsonrpc": "2.0", "id": 7, "error": {"code": -32601, "message": "no such method"}}
    assert filter_tools_list(error, policy(READ_ONLY)) == (error, [])
    other = {"jsonrpc": "2.0", "id": 7, "result": {"content": []}}
    assert filter_tools_list(other, policy(READ_ONLY)) == (other, [])


def test_tools_that_is_not_a_list_becomes_an_internal_error() -> None:
    response = {"jsonrpc": "2.0", "id": 7, "result": {"tools": {"name": "delete_item"}}}
    filtered, removed = filter_tools_list(response, policy(READ_ONLY))
    assert "result" not in filtered
    assert filtered["id"] == 7
    assert filtered["error"]["code"] == INTERNAL_ERROR_CODE
    assert removed == []


def test_tool_entries_without_a_string_name_are_dropped() -> None:
    response = tools_list(["get_weather", 42, None, ""])
    response["result"]["tools"].append("list_items")
    filtered, removed = filter_tools_list(response, policy(ALL_TOOLS))
    assert names(filtered) == ["get_weather"]
    assert removed == []


@pytest.mark.parametrize(
    "message",
    [
        call(None),
        call(42),
        call(""),
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call"},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": ["delete_item"]},
        {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {}},
        {"jsonrpc": "2.0", "id": 1, "method": 5, "params": {"name": "get_weather"}},
    ],
)
def test_malformed_tools_call_is_denied_even_for_an_allow_all_role(message: dict[str, Any]) -> None:
    decision = check_request(message, policy(ALL_TOOLS))
    assert not decision.allowed
    assert decision.reason


def test_other_methods_and_client_responses_are_allowed_without_a_tool() -> None:
    prod = policy(READ_ONLY, labels={"env": "prod"})
    for message in (
        {"jsonrpc": "2.0", "id": 1, "method": "tools/list"},
        {"jsonrpc": "2.0", "method": "notifications/initialized"},
        {"jsonrpc": "2.0", "id": 9, "result": {}},
    ):
        decision = check_request(message, prod)
        assert (decision.allowed, decision.tool) == (True, None)


def test_denial_names_the_tool_keeps_the_id_and_never_the_arguments() -> None:
    request = call("delete_item", {"item": "secret-item-id-123"}, msg_id="abc")
    decision = check_request(request, policy(READ_ONLY))
    answer = denial_response(request, decision)
    assert answer["jsonrpc"] == "2.0"
    assert answer["id"] == "abc"
    assert "result" not in answer
    assert answer["error"]["code"] == ACCESS_DENIED_CODE
    message = answer["error"]["message"]
    assert message.startswith('access denied to MCP tool "delete_item": ')
    assert "secret-item-id-123" not in json.dumps(answer)


def test_denial_of_a_tool_name_with_a_newline_stays_on_one_line() -> None:
    request = call("get_x\nFAKE LOG LINE")
    answer = denial_response(request, check_request(request, policy(NO_DELETE)))
    assert "\n" not in answer["error"]["message"]
    assert '"get_x\\nFAKE LOG LINE"' in answer["error"]["message"]


def test_denial_without_a_tool_says_what_was_wrong() -> None:
    request = call(None)
    answer = denial_response(request, check_request(request, policy(ALL_TOOLS)))
    assert answer["error"]["message"].startswith("access denied to MCP request: ")
    assert "params.name" in answer["error"]["message"]


def test_audit_fields_carry_method_tool_decision_and_no_arguments() -> None:
    request = call("delete_item", {"item": "secret-item-id-123"})
    decision = check_request(request, policy(READ_ONLY))
    fields = audit_fields(request, decision)
    assert fields == {
        "method": "tools/call",
        "tool": "delete_item",
        "allowed": "false",
        "reason": decision.reason,
    }
    listing = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
    assert audit_fields(listing, check_request(listing, policy(READ_ONLY)))["allowed"] == "true"
    assert "tool" not in audit_fields(listing, check_request(listing, policy(READ_ONLY)))


def test_iter_requests_accepts_one_message_or_a_batch() -> None:
    one = call("get_weather")
    assert iter_requests(one) == [one]
    batch = [one, {"jsonrpc": "2.0", "id": 2, "method": "tools/list"}]
    assert iter_requests(batch) == batch


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        ([], "must not be empty"),
        ([call("get_weather"), "tools/call"], "batch element 1 must be an object, not a string"),
        ("tools/call", "must be an object or an array"),
        (None, "must be an object or an array"),
    ],
)
def test_iter_requests_refuses_non_objects(payload: object, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        iter_requests(payload)
