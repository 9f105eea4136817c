"""The data engine: prompts -> orbit videos -> filtered, elevation-annotated multi-view records."""
