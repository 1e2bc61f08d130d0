"""The ASGI entry point: `uvicorn app.asgi:app` (settings come from the environment)."""

from app.factory import create_app

app = create_app()
