from vqtok.cli import main

raise SystemExit(main())
