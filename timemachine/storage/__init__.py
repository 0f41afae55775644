"""Storage: the write-ahead log, the SQLite stores, their I/O thread, crash-safe files."""
