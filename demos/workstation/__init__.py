"""`nanokit serve`: an OpenAI-compatible server with the thinking budget (server.py, cli.py)."""
