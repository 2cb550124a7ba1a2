"""kansas as a master and its workers: restarts and upgrades without a dropped connection.

The process supervisor starts (``twistd -n kansas``) is the master. It creates the
listening sockets once (``sockets``), hands them to each worker over a UNIX control
socket with SCM_RIGHTS (``control``), and never accepts a connection itself. Workers
(``worker``) adopt the sockets with ``reactor.adoptStreamPort`` and share one accept
queue. On SIGHUP the master (``master``) starts a new generation of workers from the
code on disk; once every new worker is ready, the old ones stop accepting, hand over
their in-memory state and drain.
"""
