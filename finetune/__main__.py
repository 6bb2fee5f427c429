from finetune.run import main

raise SystemExit(main())
