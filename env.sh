# The project's offline, project-local settings for every tool you run by hand (prefect, mlflow, dvc, mixbct).
#   source .venv/bin/activate && source env.sh
# The same values as flows/cli.py OFFLINE_ENV (tests/components/test_cli.py keeps the two equal); the Makefile
# exports its own copy.
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export DO_NOT_TRACK=true
export MLFLOW_DISABLE_TELEMETRY=true
export DVC_NO_ANALYTICS=1
export GX_ANALYTICS_ENABLED=false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS=60
export MLFLOW_HTTP_REQUEST_MAX_RETRIES=2
export PREFECT_LOGGING_EXTRA_LOGGERS=components
export PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW=ignore
export PREFECT_HOME="${PREFECT_HOME:-$PWD/.prefect}"
