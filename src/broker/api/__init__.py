"""Client-facing HTTP surfaces (native session API, health, OpenAPI)."""
