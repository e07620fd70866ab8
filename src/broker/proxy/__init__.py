"""The Jupyter REST and kernel WebSocket proxy under /s/{id}/."""
