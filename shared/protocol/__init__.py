"""Pure protocol code shared by the broker, the daemon and the clients.

Nothing here does I/O or imports trio: bytes in, typed frames out, and the
reverse. Submodules are imported on demand so the CLI's hot path (framing and
IPC types) never pays for the crypto libraries.

- :mod:`.errors` -- the error types and their stable codes;
- :mod:`.wire` -- broker frames (JSON over WebSocket) and their decoder;
- :mod:`.framing` -- the IPC length-prefixed msgpack framer;
- :mod:`.ipc` -- the local-socket frames;
- :mod:`.crypto` -- keys, signatures, boxes, safety numbers, fingerprints;
- :mod:`.ids` -- sortable unique ids (UUIDv7).
"""
