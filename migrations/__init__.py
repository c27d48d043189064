"""The engine's Alembic migrations: shipped inside the wheel as `engine.migrations`."""
