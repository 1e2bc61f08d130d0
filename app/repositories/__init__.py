"""advanced-alchemy repositories: queries only."""
