# The MLflow tracking server of the cluster, on PostgreSQL (psycopg 3, the driver certrepro's job
# store uses too). The same MLflow version as the certrepro image, so clients and server agree.
#
#   docker build -f docker/mlflow.Dockerfile -t certrepro-mlflow .
ARG PYTHON_VERSION=3.11
FROM python:${PYTHON_VERSION}-slim-bookworm

ARG MLFLOW_VERSION=3.17.2

ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg[binary]>=3.1"

COPY docker/healthcheck.py /usr/local/bin/certrepro-healthcheck
RUN chmod 0755 /usr/local/bin/certrepro-healthcheck \
 && useradd --create-home --uid 1000 mlflow \
 && mkdir -p /mlartifacts && chown mlflow:mlflow /mlartifacts

USER mlflow
WORKDIR /home/mlflow
EXPOSE 5000
# The command (server or `mlflow db upgrade`) comes from docker-compose.yml.
CMD ["mlflow", "--help"]
