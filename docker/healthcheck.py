#!/usr/bin/env python3
"""certrepro-healthcheck URL [URL ...]: exit 0 when every URL answers 200 within 5 s, else 1 with
the reason on stderr. The images have Python but no curl; compose's healthchecks call this.

    ray-head    http://127.0.0.1:8265/api/gcs_healthz  http://127.0.0.1:52365/api/local_raylet_healthz
    ray-worker  http://127.0.0.1:52365/api/local_raylet_healthz   (the node's dashboard agent)
    api         http://127.0.0.1:8000/healthz
    mlflow      http://127.0.0.1:5000/health
"""
import sys
import urllib.request

# never through an HTTP proxy from the environment: these are the container's own ports
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def check(url: str) -> str | None:
    """None when healthy, else why not."""
    try:
        with _OPENER.open(url, timeout=5) as response:
            return None if response.status == 200 else f"HTTP {response.status}"
    except Exception as error:  # refused, timed out, HTTP error: all mean unhealthy
        return f"{type(error).__name__}: {error}"


def main(urls: list[str]) -> int:
    if not urls:
        print("usage: certrepro-healthcheck URL [URL ...]", file=sys.stderr)
        return 2
    failures = [(url, why) for url in urls if (why := check(url)) is not None]
    for url, why in failures:
        print(f"unhealthy: {url}: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
