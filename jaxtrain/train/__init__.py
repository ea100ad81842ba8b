"""Training runs: the config, ``fit`` (a short driver), its pure ledger and
cadence, early stopping, and many seeds in one vmapped program."""
