"""Serving generation to other programs: the checks every request passes before model work."""
