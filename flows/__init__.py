"""Prefect flows and the command line: wiring only; the work is in `components`."""
