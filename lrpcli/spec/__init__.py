"""The config schema and its one-line errors: what a YAML config may say, checked without torch."""
