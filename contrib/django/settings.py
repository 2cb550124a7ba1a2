# The Django side of kansas: the kansas.zulip app. Add to /etc/zulip/settings.py (Zulip
# reads it as its prod settings), after `pip install --no-deps` of kansas into Zulip's
# virtualenv. See docs/zulip-integration.md for what the app changes, and
# docs/deploy.md (stage 2) for when.

# Load the app (keep the apps already listed: Zulip's default is ["analytics"]).
EXTRA_INSTALLED_APPS = ["analytics", "kansas.zulip"]

# THE switch: where Django sends POST /api/v1/events/internal (queue creation and its
# immediate fetch) -- kansas's internal listener instead of a Tornado port. Unset
# (None), the app changes nothing and Zulip talks to its Tornado ports as before: that
# is the roll-back.
KANSAS_INTERNAL_URL = "http://127.0.0.1:9798"

# Where the app reads kansas's rules, to route events to the right Tornado processes
# (the same authority kansas uses; a read-only role is enough: it SELECTs and LISTENs).
KANSAS_POSTGRES = "host=127.0.0.1 dbname=kansas user=kansas_reader"

# Optional: kansas's Redis, so that events also reach queues created before a placement
# change made without a reload (kansas never moves a queue). None: current rules only.
KANSAS_REDIS = "redis://127.0.0.1:6379/0"
