"""The Jetson terminal chat (chat.py); README.md walks the export on a host and the run on the board."""
