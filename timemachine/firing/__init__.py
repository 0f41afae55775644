"""Firing: the executor that fires due jobs on time and the publisher that delivers them."""
