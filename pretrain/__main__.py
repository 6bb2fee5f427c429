from pretrain.run import main

raise SystemExit(main())
