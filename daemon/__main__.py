"""``python -m claudemesh.daemon``: the same as ``claudemesh-daemon``."""

from claudemesh.daemon.main import main

raise SystemExit(main())
