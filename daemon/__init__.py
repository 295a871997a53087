"""The per-user daemon: identity, workspaces, broker links, durable outbox and inbox, local API.

Modules: :mod:`.home` (the on-disk tree, root key, lock), :mod:`.store`
(SQLite outbox/inbox/events per workspace), :mod:`.ipcserver` (the local
sockets), :mod:`.link` (one broker WebSocket per workspace), :mod:`.invites`
(invite links and sealed join payloads), :mod:`.service` (the request
handlers), :mod:`.main` (the entry point).
"""
