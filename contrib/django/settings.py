# The Django side of kansas: add to /etc/zulip/settings.py (Zulip reads it as its
# prod settings). See docs/zulip-integration.md for the code that reads these.

# THE setting for queue creation: where Django sends POST /api/v1/events/internal (and
# its immediate follow-up fetch) -- kansas's internal listener instead of a Tornado
# port. Unset (None), Zulip talks to its Tornado ports as before: that is the roll-back.
KANSAS_INTERNAL_URL = "http://127.0.0.1:9798"

# Where kansas.placement reads kansas's rules, to route events to the right Tornado
# processes (the same authority kansas uses; a read-only role is enough: it SELECTs and
# LISTENs).
KANSAS_POSTGRES = "host=127.0.0.1 dbname=kansas user=kansas_reader"

# Optional: kansas's Redis, so that events also reach queues created before an
# assignment change (kansas never moves a queue). None: current rules only.
KANSAS_REDIS = "redis://127.0.0.1:6379/0"
