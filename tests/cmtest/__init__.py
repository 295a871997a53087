"""Test support shared by the suites.

Importable because pytest puts ``tests/support`` (which links here) on sys.path.

Each module here is owned by one area: ``broker`` starts a real broker
subprocess, ``daemon`` real daemon subprocesses in temporary homes.
"""
