"""Demos: the workstation server with its web page (`demos.workstation`) and the Jetson chat (`demos.jetson`)."""
