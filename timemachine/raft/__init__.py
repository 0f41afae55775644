"""Raft consensus: a sans-I/O core (`core`), its log (`log`, `storage`), and a seeded
simulation that proves it (`sim`)."""
