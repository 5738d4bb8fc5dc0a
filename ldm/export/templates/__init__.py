"""Files copied verbatim into an exported folder: they import diffusers, nothing imports them."""
