"""What a Ray worker runs: one row config -> train -> certify -> result (see runner.py)."""
