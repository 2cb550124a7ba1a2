"""kansas: routes Zulip's real-time event queues to the Tornado shard that owns them."""

__version__ = "0.1.0"
