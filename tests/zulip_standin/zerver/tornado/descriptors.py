"""Stand-in: the process's own Tornado port (None outside Tornado)."""

current_port: int | None = None


def is_current_port(port: int) -> bool:
    return current_port == port
