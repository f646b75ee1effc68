"""Errors a user can act on. Each message names the file or field at fault."""


class UpgradeError(Exception):
    """Base class: the CLI prints the message and exits non-zero, with no traceback."""


class ConfigError(UpgradeError):
    """params.yaml (or a CLI override) is malformed: unknown key, wrong type, bad value."""


class DataError(UpgradeError):
    """An input file is missing, unreadable or malformed."""


class ValidationFailed(UpgradeError):
    """A Great Expectations suite failed; `report` is the markdown report path."""

    def __init__(self, message: str, report: str | None = None) -> None:
        super().__init__(message)
        self.report = report


class IncompatibleModel(UpgradeError):
    """The old model cannot be paired with the new one (e.g. embedding dimensions differ)."""
