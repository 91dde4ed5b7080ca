"""The augmentation search without Ray: its spec, the rows of its trials, and the report a person reads."""
