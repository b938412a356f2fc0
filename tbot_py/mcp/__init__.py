"""MCP access: what sits between an MCP client and an MCP server enrolled as an app.

:mod:`.authz` is the pure authorization filter over JSON-RPC 2.0 messages: which
``tools/call`` requests may reach the upstream server, which tools a ``tools/list``
answer may show, the error a denied call gets, and the fields of its audit line.
:mod:`.clientconfig` renders the ``mcpServers`` entry that makes an MCP client run
``tbot-py mcp connect``. The access proxy and the stdio connector build on these.
Importing this package loads none of its modules.
"""
