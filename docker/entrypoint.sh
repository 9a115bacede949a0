#!/bin/sh
# certrepro-entrypoint ROLE [EXTRA ARGS]: what one container of the cluster runs.
#
#   ray-head    the Ray head: GCS on $RAY_PORT (6379), dashboard on $RAY_DASHBOARD_PORT (8265), no
#               CPUs or GPUs of its own unless $RAY_HEAD_NUM_CPUS says so (rows run on workers)
#   ray-worker  a Ray worker node joining $RAY_ADDRESS with the CPUs and GPUs it sees
#               ($RAY_NUM_CPUS / $RAY_NUM_GPUS override what Ray detects)
#   api         `certrepro serve` on $CERTREPRO_PORT (8000) with its dispatcher; the Ray driver in
#               it needs a Ray node on its own machine, so it first joins $RAY_ADDRESS as a node
#               with no CPUs or GPUs (no row ever lands there)
#   anything else is run as a command (e.g. `bash`, `certrepro status JOB`)
#
# EXTRA ARGS go to `ray start` (ray-head, ray-worker) or `certrepro serve` (api); a later option
# wins over the defaults here. The Ray roles stay in the foreground (--block): the container lives
# as long as the node.
set -eu

role="${1:-api}"
[ "$#" -gt 0 ] && shift

# optional `ray start` options taken from the environment
node_options() {
    [ -n "${RAY_NUM_CPUS:-}" ] && printf ' --num-cpus=%s' "$RAY_NUM_CPUS"
    [ -n "${RAY_NUM_GPUS:-}" ] && printf ' --num-gpus=%s' "$RAY_NUM_GPUS"
    [ -n "${RAY_OBJECT_STORE_MEMORY:-}" ] && printf ' --object-store-memory=%s' "$RAY_OBJECT_STORE_MEMORY"
    return 0
}

case "$role" in
    ray-head)
        # shellcheck disable=SC2046 # node_options is a list of words on purpose
        exec ray start --head --port="${RAY_PORT:-6379}" \
            --dashboard-host=0.0.0.0 --dashboard-port="${RAY_DASHBOARD_PORT:-8265}" \
            --num-cpus="${RAY_HEAD_NUM_CPUS:-0}" --num-gpus=0 \
            $(node_options) --disable-usage-stats --block "$@"
        ;;
    ray-worker)
        : "${RAY_ADDRESS:?set RAY_ADDRESS to the head, e.g. ray-head:6379}"
        # shellcheck disable=SC2046
        exec ray start --address="$RAY_ADDRESS" $(node_options) --disable-usage-stats --block "$@"
        ;;
    api)
        : "${RAY_ADDRESS:?set RAY_ADDRESS to the head, e.g. ray-head:6379}"
        ray start --address="$RAY_ADDRESS" --num-cpus=0 --num-gpus=0 --disable-usage-stats
        exec certrepro serve --host 0.0.0.0 --port "${CERTREPRO_PORT:-8000}" "$@"
        ;;
    *)
        exec "$role" "$@"
        ;;
esac
