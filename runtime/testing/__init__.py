"""Test doubles, in one clearly named place (like ``trio.testing``): never used by a production path.

``fake_engine`` (a latency-model ``Engine`` and a virtual-clock event loop) and ``toy_env`` (a
one-turn "call the tool the user names" environment, a learnability probe).
"""
