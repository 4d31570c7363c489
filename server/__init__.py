"""sitefit's HTTP API (FastAPI). ``create_app(settings)`` builds it; it never imports torch."""

from server.app import create_app

__all__ = ["create_app"]
