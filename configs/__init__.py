"""ml_collections config files: `--config=configs/<file>.py[:<arg>]`."""
