from sealkv.node.cli.main import main

main()
