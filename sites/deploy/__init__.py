"""A site's side of a real deployment: connecting to a SuperLink and pinning the app bundle."""
