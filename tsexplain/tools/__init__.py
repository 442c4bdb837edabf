"""Tools around the served models: the client, the launcher, the evaluation and the
synthetic data. They stay out of MARs (``scripts/build_mar.py`` packs ``attr`` and
``serving`` only)."""
