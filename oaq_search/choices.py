"""The names of the built-in quantizer choices, free of heavy imports so the CLI can offer them at once."""

METHODS = ("oaq", "vanilla", "literal")  # weight quantizers: see oaq_search/oaq.py
GRIDS = ("uniform", "pot", "ipot", "midrise")  # code grids: see oaq_search/grids.py
CODE_PACKINGS = ("fields", "base3")  # how codes are stored: see oaq_search/packing.py
