"""Summary statistics and figures of results folders."""
