"""detkit's Hydra configs, installed as the package ``detkit.configs`` so that ``detkit.config_dir()`` finds them
without a checkout; the YAML files are its package data."""
