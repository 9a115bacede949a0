"""The job lifecycle: settings, the SQL job store, the dispatcher, Ray submission, the MLflow
recorder and table assembly."""
