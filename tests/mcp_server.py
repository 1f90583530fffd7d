"""A tiny MCP server over stdio for the engine tests: one tool, ``add``, and instructions.

Every launch and every tool call is appended to the file named by ``$MCP_CALL_LOG``, so a test can
prove that a replayed run neither calls the tool again nor even starts the server.
"""

from __future__ import annotations

import os

from mcp.server.mcpserver import MCPServer

server = MCPServer("calc", instructions="Use `add` for any arithmetic; never add numbers in your head.")


def log(line: str) -> None:
    path = os.environ.get("MCP_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


@server.tool()
def add(a: int, b: int) -> int:
    """Add two integers."""
    log(f"add:{a}+{b}")
    return a + b


if __name__ == "__main__":
    log("start")
    server.run("stdio")
