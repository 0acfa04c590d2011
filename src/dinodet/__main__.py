from dinodet.cli import main

raise SystemExit(main())
