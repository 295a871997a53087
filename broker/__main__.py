"""``python -m claudemesh.broker`` is ``claudemesh-broker``."""

from claudemesh.broker.cli import main

main()
