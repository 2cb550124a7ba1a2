# The twistd plugin: `twistd kansas`. The module is named as a string so that listing
# plugins does not import kansas.
from twisted.application.service import ServiceMaker

kansas = ServiceMaker(
    "kansas", "kansas.tap", "Route Zulip event queues to Tornado shards.", "kansas"
)
