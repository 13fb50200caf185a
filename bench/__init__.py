"""The IEI benchmark: the model's in-process limit and the served stack, measured in one run.

Lives beside the frontend (it needs torch); `make bench` or `.venv/bin/python -m bench`.
"""
