"""Transparent queue moves: the shard-side protocol's pure parts, the mover, and the
kansas-side holding of requests (see docs/transparent-moves.md)."""
