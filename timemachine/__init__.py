"""timeMachine: a distributed, fault-tolerant scheduler database on Twisted."""

__version__ = "0.1.0"
