from vitpipe.cli import main

raise SystemExit(main())
