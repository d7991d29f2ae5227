"""The host agent: runs instances through a driver and keeps the controller informed."""
