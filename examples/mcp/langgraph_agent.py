"""List an MCP app's tools through tbot-py from LangChain, and optionally run an agent on them.

    python examples/mcp/langgraph_agent.py [APP ...]          # default: weather

Each app is reached as a stdio MCP server that runs ``tbot-py mcp connect``, so the
script holds no credential: the connector presents the agent bot's identity file to
the access proxy, which shows only the tools the bot's roles allow. Listing needs no
LLM. With ``langgraph`` installed (``pip install langgraph langchain langchain-anthropic``)
and ``--model`` or ``LANGGRAPH_MODEL`` set (e.g. ``anthropic:claude-sonnet-4-5``, with that
provider's API key in the environment), a ReAct agent also answers ``--prompt``.

Settings, flag or environment: ``-i`` / ``TBOT_PY_IDENTITY`` (default
/opt/machine-id/identity), ``--proxy`` / ``TBOT_PY_MCP_PROXY`` (default 127.0.0.1:3080),
``--tbot-py`` / ``TBOT_PY`` (default ``tbot-py`` on PATH).

Every tool call through ``client.get_tools()`` tools opens a fresh MCP session (a new
connector process); a long-running agent would hold one with ``client.session(app)``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import sys

from langchain_core.tools import BaseTool
from langchain_mcp_adapters.client import MultiServerMCPClient
from langchain_mcp_adapters.sessions import StdioConnection

DEFAULT_IDENTITY = "/opt/machine-id/identity"
DEFAULT_PROXY = "127.0.0.1:3080"
DEFAULT_PROMPT = "What is the weather in Lisbon?"


def connector_connection(tbot_py: str, identity: str, proxy: str, app: str) -> StdioConnection:
    """The stdio server entry that runs ``tbot-py mcp connect`` for ``app``."""
    return {
        "transport": "stdio",
        "command": tbot_py,
        "args": ["mcp", "connect", "-i", identity, "--proxy", proxy, app],
    }


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Flags, with defaults from the environment."""
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("apps", nargs="*", default=["weather"], metavar="APP")
    parser.add_argument("-i", "--identity", default=env.get("TBOT_PY_IDENTITY", DEFAULT_IDENTITY))
    parser.add_argument("--proxy", default=env.get("TBOT_PY_MCP_PROXY", DEFAULT_PROXY))
    parser.add_argument("--tbot-py", dest="tbot_py", default=env.get("TBOT_PY", "tbot-py"))
    parser.add_argument("--model", default=env.get("LANGGRAPH_MODEL", ""))
    parser.add_argument("--prompt", default=DEFAULT_PROMPT)
    return parser.parse_args(argv)


async def run(args: argparse.Namespace) -> int:
    """List each app's tools; then run the optional agent. Returns the exit status."""
    client = MultiServerMCPClient(
        {
            app: connector_connection(args.tbot_py, args.identity, args.proxy, app)
            for app in args.apps
        }
    )
    tools: list[BaseTool] = []
    for app in args.apps:
        try:
            app_tools = await client.get_tools(server_name=app)
        except Exception as exc:  # the connector's own stderr line, above, says why
            cause = _innermost(exc)
            print(f"{app}: cannot list tools: {type(cause).__name__}: {cause}", file=sys.stderr)
            return 1
        print(f"{app}: {', '.join(sorted(tool.name for tool in app_tools)) or '(no tools)'}")
        tools += app_tools
    if not args.model:
        return 0
    if importlib.util.find_spec("langgraph") is None:
        print("--model needs langgraph: pip install langgraph langchain", file=sys.stderr)
        return 1
    from langgraph.prebuilt import create_react_agent

    agent = create_react_agent(args.model, tools)
    result = await agent.ainvoke({"messages": [{"role": "user", "content": args.prompt}]})
    print(result["messages"][-1].content)
    return 0


def _innermost(exc: BaseException) -> BaseException:
    """The first real error inside the task groups the MCP client nests it in."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


def main(argv: list[str] | None = None) -> int:
    """Entry point: ``python langgraph_agent.py [APP ...]``."""
    return asyncio.run(run(parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    sys.exit(main())
