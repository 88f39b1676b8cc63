"""``python -m gateway``: the ``stepup-gateway`` command line (:mod:`gateway.cli`)."""

from gateway.cli import main

raise SystemExit(main())
