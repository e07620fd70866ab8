"""What agents use: the execute and files API, the kernel client behind it, the Python client
and the MCP server (see docs/agents.md)."""
