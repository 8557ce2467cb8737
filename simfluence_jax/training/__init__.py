"""Multi-run training producing traces."""
