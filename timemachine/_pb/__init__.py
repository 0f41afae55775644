"""Modules generated from proto/ by ``python -m timemachine._pb.generate``; do not edit."""
