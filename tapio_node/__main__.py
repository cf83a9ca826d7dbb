from tapio_node.cli import main

raise SystemExit(main())
