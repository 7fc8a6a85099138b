"""The client side: what runs on every start of a starter. Stdlib only; imports nothing from
the server side, the installer or the pool (tests/test_structure.py checks it)."""
