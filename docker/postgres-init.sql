-- Runs once, when the postgres volume is first created: the database that POSTGRES_DB names
-- (`jobs`, certrepro's job store) already exists; MLflow gets its own next to it.
CREATE DATABASE mlflow;
