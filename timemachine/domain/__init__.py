"""The domain: jobs, routes, the commands of the logs, and the errors users see.

Everything here is a frozen, slotted dataclass that validates on construction, so a
value that exists is a valid one. Nothing here does I/O.
"""
