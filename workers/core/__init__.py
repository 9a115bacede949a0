"""The certified-training core: data sets, models, bounds, methods, schedules, attacks,
certifiers and the training loop. Pure PyTorch (+ numpy/scipy, scikit-learn for `digits`, pydantic
for the config schema); nothing here knows about Ray, MLflow, FastAPI or SQL."""
