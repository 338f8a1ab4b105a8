"""The lab: what minidiff has for learning, beyond the models and the loop (see docs/architecture.md)."""
