"""The shipped configs (`*.yaml`), installed beside the packages so that `--config NAME` works from any directory
(`model.config.config_path`)."""
