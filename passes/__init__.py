"""Graph passes: labelling, attention decomposition, and (next) protection."""
