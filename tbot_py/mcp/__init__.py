"""MCP access: MCP clients reach MCP servers enrolled as apps, through the access proxy.

The client side, light enough to start per session: :mod:`.connector` (the stdio bridge
behind ``tbot-py mcp connect``, across identity renewals), :mod:`.dial` (mTLS to the
proxy with an identity file, the hello) and :mod:`.clientconfig` (the ``mcpServers``
entry ``tbot-py mcp config`` writes). Shared: :mod:`.tunnel`, the connector-to-proxy
protocol. The proxy side: :mod:`.proxy` (``tbot-py mcp-proxy start``), its config
(:mod:`.proxyconfig`), its own credentials (:mod:`.proxyauth`), the upstream MCP servers
over stdio and streamable HTTP (:mod:`.upstream`) and the authorization filter over
JSON-RPC messages (:mod:`.authz`). Importing this package loads none of its modules.
"""
