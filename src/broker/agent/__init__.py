"""What agents use: the MCP server (see docs/agents.md)."""
