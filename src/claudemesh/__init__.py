"""claudemesh: end-to-end encrypted messaging between AI coding sessions and their people."""

__version__ = "0.1.0"

# The local API version spoken on the daemon's sockets; bumped when a client
# needs a request the daemon may not know.
API_VERSION = 1
