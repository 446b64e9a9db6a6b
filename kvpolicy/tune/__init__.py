"""`kvpolicy tune`: the candidate space (space.py), the search on a real model (search.py), its
ranking proxy (proxy.py) and what it writes (front.py). docs/tune.md."""
