"""Pure influence math: imports torch only."""
