"""The HTTP API (FastAPI): validates requests, writes jobs to the store, reads them back."""
