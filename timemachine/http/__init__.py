"""The REST API (Klein): request limits, parsing, routes, errors."""
