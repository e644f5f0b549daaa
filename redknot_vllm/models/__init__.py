"""RedKnot model overrides: thin subclasses of vLLM's models, wired by :mod:`.apply`."""
