"""Prefect flows and the command line: wiring only; the work is in `components`."""

import logging

# The components' INFO lines ("resuming from checkpoint ...") reach Prefect's handlers through
# PREFECT_LOGGING_EXTRA_LOGGERS=components (flows.cli.OFFLINE_ENV); Prefect copies handlers, not levels.
# Set here so that every flow (upgrade, benchmark) logs them.
logging.getLogger("components").setLevel(logging.INFO)
