"""Claude Code integration: the MCP stdio adapter (``claudemesh mcp``), the
hooks it relies on, and ``claudemesh install`` / ``uninstall``.

- :mod:`.adapter` -- JSON-RPC on stdin/stdout, channel notifications from the daemon;
- :mod:`.hook` -- the SessionStart / UserPromptSubmit / Stop hook commands;
- :mod:`.install` -- registers the server, hooks and skill with Claude Code;
- :mod:`.paths` -- where the daemon's sockets and the hook hand-over files live.
"""
