"""`vlkit doctor`: checks that say what is wrong on this machine and how to fix it; `vlkit health`.

facts.py gathers everything that needs the system (subprocesses, files, sockets) concurrently with
short timeouts; the check modules turn those facts into Check rows and are pure, so tests feed
them recorded outputs.
"""
