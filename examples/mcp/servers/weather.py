"""A small MCP server over stdio, for the walkthrough: the ``weather`` app.

The access proxy starts it (``mcp+stdio://`` in proxy.yaml) once per session, with the
proxy's own environment; it needs the ``mcp`` package (``pip install mcp``). Its data
is made up: the point is the tool names, which the roles allow or deny.
"""

from __future__ import annotations

from mcp.server.fastmcp import FastMCP

server = FastMCP("weather")

_CONDITIONS = {"berlin": "cloudy, 11 °C", "lisbon": "sunny, 19 °C", "oslo": "snow, -3 °C"}


@server.tool()
def get_weather(city: str) -> str:
    """The current weather in ``city``."""
    return _CONDITIONS.get(city.lower(), f"no station near {city}")


@server.tool()
def list_stations() -> list[str]:
    """The cities this server knows."""
    return sorted(_CONDITIONS)


@server.tool()
def set_alert(city: str, threshold_celsius: float) -> str:
    """Alert when ``city`` drops below a temperature: a write, which read-only roles deny."""
    return f"alert set for {city} below {threshold_celsius} °C"


if __name__ == "__main__":
    server.run("stdio")
