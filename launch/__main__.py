"""`python -m launch ...` runs the same CLI as the `blockprune` console script."""

from launch.cli import main

raise SystemExit(main())
