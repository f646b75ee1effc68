"""Prefect flows and the command line: wiring only; the work is in `components`."""

import logging

# The components' INFO lines ("resuming from checkpoint ...") reach Prefect's handlers through
# PREFECT_LOGGING_EXTRA_LOGGERS=components (flows.cli.OFFLINE_ENV); Prefect copies handlers, not levels.
# Set here so that every flow (upgrade, benchmark) logs them.
logging.getLogger("components").setLevel(logging.INFO)


class _BadInputWithoutTraceback(logging.Filter):
    """Prefect logs a failed flow or task run's exception with its traceback. For an UpgradeError (bad input: the
    message names the file or field, the CLI prints it as one line) the traceback only hides that line, so it is
    dropped from the record; the message stays, in the console and in the flow run's logs in the UI."""

    def filter(self, record: logging.LogRecord) -> bool:
        from components.errors import UpgradeError

        if record.exc_info and isinstance(record.exc_info[1], UpgradeError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.flow_runs", "prefect.task_runs"):
    logging.getLogger(_name).addFilter(_BadInputWithoutTraceback())
