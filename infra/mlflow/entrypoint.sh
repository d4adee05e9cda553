#!/bin/sh
# Start the shared MLflow tracking server with MLflow's basic auth on. Everything secret comes from the
# environment (a Kubernetes Secret or the compose file's .env), never from a file in the repository:
#   MLFLOW_BACKEND_STORE_URI   runs and metrics (postgresql://user:pass@host/db; sqlite:///path in tests)
#   MLFLOW_AUTH_DATABASE_URI   users and permissions (defaults to the backend store)
#   MLFLOW_ARTIFACTS_DESTINATION  where artifacts go (s3://bucket/prefix with MinIO; a folder in tests)
#   MLFLOW_AUTH_ADMIN_USERNAME / MLFLOW_AUTH_ADMIN_PASSWORD  the admin created on first start
#   MLFLOW_FLASK_SERVER_SECRET_KEY  signs the auth app's sessions (CSRF)
#   MLFLOW_HOST (127.0.0.1), MLFLOW_PORT (5000)
#   MLFLOW_WORKERS (4)         server processes; `mlflow server` reads it itself
set -eu
: "${MLFLOW_BACKEND_STORE_URI:?set MLFLOW_BACKEND_STORE_URI}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?set MLFLOW_ARTIFACTS_DESTINATION}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?set MLFLOW_AUTH_ADMIN_PASSWORD (from a secret)}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?set MLFLOW_FLASK_SERVER_SECRET_KEY (from a secret)}"
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
# MLflow 3's job runner (huey consumers for GenAI scoring jobs) is off unless asked for: training runs
# never use it, and it is one more set of processes to start and stop.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

# The auth app reads its database URI from an ini file only, so the file is written at start-up, into a
# private temporary directory, from the environment.
conf_dir="$(mktemp -d)"
chmod 700 "$conf_dir"
cat > "$conf_dir/basic_auth.ini" <<INI
[mlflow]
default_permission = READ
database_uri = ${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
INI
export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"

exec mlflow server --app-name basic-auth \
  --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
  --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" --serve-artifacts \
  --host "${MLFLOW_HOST:-127.0.0.1}" --port "${MLFLOW_PORT:-5000}"
