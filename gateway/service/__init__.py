"""The service layer: the work behind each route, with no knowledge of FastAPI."""
