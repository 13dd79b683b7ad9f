"""substrate package."""
