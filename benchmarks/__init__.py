"""Speed, memory and quality measurements (``make bench``); not tests: they report figures."""
