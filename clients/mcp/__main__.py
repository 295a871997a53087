"""``python -m claudemesh.clients.mcp``: the adapter, without the CLI's start-up cost."""

from claudemesh.clients.mcp.adapter import main

main()
