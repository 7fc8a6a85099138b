"""The server side: preload, the selector loop, the standby pool, and a child's life."""
