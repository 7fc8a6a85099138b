"""py-preload: keep heavy Python imports warm behind a drop-in `python` starter."""
