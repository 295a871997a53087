"""The routing-only broker (architecture.md section 7): relays end-to-end
encrypted envelopes between members, keeps them for members who are offline,
and tracks presence.  It routes; it cannot read."""

from claudemesh import __version__

__all__ = ["__version__"]
