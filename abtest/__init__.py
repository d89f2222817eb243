"""abtest."""
