from tdpu_tui.cli import main

raise SystemExit(main())
