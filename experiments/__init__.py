"""Experiments that prove a claim end to end on the phantom (run as scripts or with ``python -m``)."""
