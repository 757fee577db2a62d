"""The HTTP API service (`python -m api`): see api/app.py."""
